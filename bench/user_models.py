"""Input conventions on real pretrained classifiers: top-1 agreement and KL against the float model, int8 latency.

    python -m bench.user_models MODEL.keras [MODEL.keras ...] --crops 400 --runs 50
    python -m bench.user_models --applications --crops 400 --runs 50

``--applications`` measures the five architectures the tests convert
(``keras.applications`` without weights, seed 0, BatchNorm statistics spread
as in ``tests/conversion/test_user_models.py``), each with the default pad only.

For each model, each way ``convert --int8`` can give it its input: ``[-1, 1]``
int8 (``--input-convention signed-unit``, the only one before padded stems
folded) and uint8 pixels with each stem pad (``pipeline.model.stem.StemPad``:
pixel 128, pixel 127, pixel 128 plus the border correction; one row when the
stem pads with a whole pixel or not at all). Each int8 model is fed by
validate's own runner and compared with the float Keras model on the same
decoded pixels: top-1 agreement and mean KL(float || int8); the float effect
of the pad alone (the folded float model against the original) beside it; and
the int8 model's p50 latency from ``devices/runner.py`` (one thread, XNNPACK);
whether MediaPipe's ``ImageClassifier`` loads it and, where it does, its
scores against validate's runner's on the same photos (top-1 matches and the
largest score difference); and the manifest's XNNPACK partitions. Beside
them, the float .tflite against the float Keras model: what conversion alone
changes.

The photos are the real ones that installed packages ship (scikit-learn's
``china.jpg`` and ``flower.jpg``, matplotlib's ``grace_hopper.jpg``): ``--crops``
random square crops of them (side 30-100% of the shorter edge, seed 0),
resized to the model's input as ``pipeline.core.preprocessing`` resizes. The
calibration set is another 64 crops (seed 1). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.machine import describe, load_average
from pipeline.conversion import convention_choice
from pipeline.conversion.export import ConvertSettings, export_tflite
from pipeline.core.preprocessing import PreprocessSpec, model_input
from pipeline.model.modelio import load_source
from pipeline.model.keras_output import keras_probabilities
from pipeline.model.stem import Stem, StemPad, find_stem, fold_effect, fold_stem
from pipeline.validation.predict import TfliteRunner

ROOT = Path(__file__).resolve().parents[1]


def shipped_photos() -> list[Path]:
    """The photographs inside installed packages (found, not downloaded)."""
    import matplotlib
    import sklearn

    return [Path(sklearn.__file__).parent / "datasets" / "images" / name for name in ("china.jpg", "flower.jpg")] + [
        Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]


def crops(photos: list[Path], n: int, size: int, seed: int) -> np.ndarray:
    """``n`` random square crops of the photos, resized (bilinear) to size x size RGB uint8."""
    rng = np.random.default_rng(seed)
    images = [Image.open(p).convert("RGB") for p in photos]
    out = []
    for i in range(n):
        image = images[i % len(images)]
        side = int(min(image.size) * rng.uniform(0.3, 1.0))
        x, y = rng.integers(0, image.size[0] - side + 1), rng.integers(0, image.size[1] - side + 1)
        out.append(np.asarray(image.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR)))
    return np.stack(out)


class _Calibration:
    """The calibration crops as ``export_tflite``'s representative dataset (``calibrate.dataset``'s protocol)."""

    def __init__(self, pixels: np.ndarray, convention: str):
        self.pixels, self.spec = pixels, PreprocessSpec(size=pixels.shape[1], input_convention=convention)

    def __len__(self) -> int:
        return len(self.pixels)

    def inputs(self, i: int) -> np.ndarray:
        return model_input(self.pixels[i], self.spec.input_convention)

    def batches(self):
        for i in range(len(self)):
            yield [self.inputs(i)[None]]

    def with_convention(self, convention: str) -> "_Calibration":
        return _Calibration(self.pixels, convention)

    def to_manifest(self) -> dict:
        return {"folder": "photo crops (bench.user_models)", "count": len(self)}


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    eps = 1e-12
    return float(np.mean(np.sum(p * (np.log(p + eps) - np.log(q + eps)), axis=1)))


def _latency(path: Path, runs: int, baseline: Path | None) -> dict:
    """p50 of the int8 model; with a baseline, both interleaved in one process and the ratio of their p50s."""
    models = [str(path)] if baseline is None else [str(baseline), str(path)]
    proc = subprocess.run([sys.executable, str(ROOT / "devices" / "runner.py"), *models, "--runs", str(runs),
                           "--warmup", "10", "--threads", "1"], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if baseline is None:
        return {"p50_ms": result["latency_ms"]["p50"]}
    return {"p50_ms": result["results"][1]["latency_ms"]["p50"],
            "p50_ratio_to_first_option": result["compare"]["ratio_b_over_a"]["p50"]}


def mediapipe_parity(path: Path, photos: np.ndarray, ours: np.ndarray) -> dict:
    """Whether MediaPipe's ImageClassifier loads the model and, if so, how its scores (every class) compare with
    validate's runner's on the same decoded pixels: top-1 matches and the largest score difference."""
    import mediapipe as mp
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions

    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)), max_results=-1)
    try:
        classifier = vision.ImageClassifier.create_from_options(options)
    except Exception as exc:  # noqa: BLE001 - MediaPipe raises RuntimeError or ValueError with its reason
        return {"loads": False, "error": str(exc).splitlines()[0][:200]}
    theirs = np.zeros_like(ours)
    with classifier:
        for row, one in enumerate(photos):
            result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(one)))
            for category in result.classifications[0].categories:
                theirs[row, category.index] = category.score
    return {"loads": True, "top1_equal": int(np.sum(theirs.argmax(1) == ours.argmax(1))), "images": len(photos),
            "max_abs_score_difference": float(np.abs(theirs - ours).max())}


def applications(folder: Path) -> list[Path]:
    """The tests' five architectures, saved as .keras files in ``folder`` (module docstring)."""
    import keras

    def spread(model):
        rng = np.random.default_rng(0)
        for layer in model.layers:
            if type(layer).__name__ == "BatchNormalization":
                g, b, m, v = layer.get_weights()
                layer.set_weights([rng.uniform(0.5, 2, g.shape), rng.normal(0, 0.5, b.shape),
                                   rng.normal(0, 0.5, m.shape), rng.uniform(0.5, 2, v.shape)])
        return model

    paths = []
    for name, kwargs in (("Xception", {}), ("MobileNetV2", {"alpha": 0.35}), ("MobileNetV3Small", {"alpha": 0.75}),
                         ("EfficientNetB0", {}), ("ResNet50", {})):
        keras.utils.set_random_seed(0)
        if name == "Xception":  # nested, as Keras' transfer-learning guide builds it
            base = spread(keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3)))
            inputs = keras.Input((71, 71, 3))
            x = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
            x = keras.layers.Dropout(0.2)(keras.layers.Dense(16, activation="relu")(x))
            model = keras.Model(inputs, keras.layers.Dense(10)(x), name="fine_tuned")
        else:
            model = spread(getattr(keras.applications, name)(input_shape=(32, 32, 3), weights=None, classes=10,
                                                              **kwargs))
        paths.append(folder / f"{name}.keras")
        model.save(paths[-1])
    return paths


def options(stem, every_pad: bool = True) -> list[tuple[str, str, StemPad | None]]:
    """(row name, input convention, stem pad) for every way this model can be converted."""
    rows = []
    if not isinstance(stem, Stem) or stem.domain == "signed_unit":
        rows.append(("[-1, 1] int8", "signed_unit", None))
    if isinstance(stem, Stem):
        pads = [StemPad.NEAREST] if stem.exact or not every_pad else list(StemPad)
        rows += [(f"pixels, pad {p}" if stem.padded else "pixels", "pixels", p) for p in pads]
    return rows


def float_tflite(model_path: Path, photos: np.ndarray, reference: np.ndarray, tmp: Path, source) -> dict:
    """The float .tflite (``convert --float``'s defaults) against the float Keras model on the photos: what the
    conversion alone changes, so that an int8 loss is told from a conversion error."""
    out = tmp / f"{model_path.stem}-float.tflite"
    result = export_tflite(model_path, ConvertSettings("float"), out=out, force=True)
    runner = TfliteRunner(out, workers=2)
    try:
        got = keras_probabilities(source.model, runner.predict_pixels(photos))
    finally:
        runner.close()
    return {"convention": result.manifest["input_convention"]["name"],
            "top1_agreement": float(np.mean(got.argmax(1) == reference.argmax(1))),
            "max_abs_probability_difference": float(np.abs(got - reference).max())}


def measure(model_path: Path, photos: np.ndarray, calibration: np.ndarray, runs: int, tmp: Path,
            every_pad: bool = True) -> dict:
    """Every option's agreement, KL and latency for one model (module docstring)."""
    source = load_source(model_path)
    stem = find_stem(source.model)
    domain = stem.domain if isinstance(stem, Stem) else "signed_unit"
    reference = keras_probabilities(source.model, source.model.predict(model_input(photos, domain), batch_size=16,
                                                                   verbose=0))
    rows, first = [], None
    for name, convention, pad in options(stem, every_pad):
        if pad is not None:
            convention_choice.STEM_PAD = pad  # the choice the conversion reads; restored below
        try:
            out = tmp / f"{model_path.stem}-{len(rows)}.tflite"
            result = export_tflite(model_path, ConvertSettings("int8", input_convention=convention), out=out,
                                   representative=_Calibration(calibration, convention), force=True)
        finally:
            convention_choice.STEM_PAD = StemPad.NEAREST
        runner = TfliteRunner(out, workers=2)
        try:
            got = runner.predict_pixels(photos)
        finally:
            runner.close()
        parity = mediapipe_parity(out, photos, got)
        got = keras_probabilities(source.model, got)  # a softmax as it is, logits through one
        got = got / np.maximum(got.sum(axis=1, keepdims=True), 1e-12)  # a uint8 softmax sums to about 1
        row = {"option": name, "top1_agreement": float(np.mean(got.argmax(1) == reference.argmax(1))),
               "mean_kl": _kl(reference, got), **_latency(out, runs, first),
               "why": result.manifest["input_convention"]["why"], "mediapipe": parity,
               "xnnpack": result.manifest["xnnpack"]}
        if pad is not None and isinstance(stem, Stem) and not stem.exact:
            row["float_pad_effect"] = fold_effect(source.model, fold_stem(source.model, stem, pad), domain, photos)
        rows.append(row)
        first = first or out
    return {"model": str(model_path), "input_size": source.input_size, "classes": source.classes,
            "inlined_models": source.cache.inlined_models,
            "stem": stem if isinstance(stem, str) else stem.describe(StemPad.NEAREST), "rows": rows,
            "float_tflite": float_tflite(model_path, photos, reference, tmp, source)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.user_models", description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--applications", action="store_true", help="also the tests' five architectures")
    ap.add_argument("--crops", type=int, default=400)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    load = load_average()
    results = []
    with tempfile.TemporaryDirectory(prefix="xedge-user-models-") as tmp:
        built = applications(Path(tmp)) if args.applications else []
        for path in [*args.models, *built]:
            size = load_source(path).input_size
            photos, calibration = crops(shipped_photos(), args.crops, size, 0), crops(shipped_photos(), 64, size, 1)
            results.append(measure(path, photos, calibration, args.runs, Path(tmp), every_pad=path not in built))
    text = json.dumps({"machine": describe(load), "crops": args.crops, "results": results}, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

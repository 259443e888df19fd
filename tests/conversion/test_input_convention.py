"""Input conventions: pixel-exact int8 input, the fold behind it, and models from before conventions existed.

The default --int8 model takes uint8 RGB pixels (the [-1, 1] scaling folded into
the first convolution, the input pinned to scale 1); ``signed_unit`` is the old
[-1, 1] input, still converted on request and still validated correctly.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.conversion.export import ConvertSettings, export_tflite
from pipeline.core.artifacts import manifest_path_for
from pipeline.core.data import Item
from pipeline.core.errors import ConversionError, Remedy
from pipeline.core.preprocessing import PreprocessSpec, model_input, pixels_for, quantize, scale
from pipeline.model.stem import Stem, find_stem, fold_stem, layer_graph
from pipeline.model.xception import build_xception
from pipeline.tflite import flatbuffers
from pipeline.tflite.runtime import open_interpreter
from pipeline.validation.predict import TfliteRunner
from pipeline.validation.validate import load_item, validate
from tests.conftest import TINY, spread_batchnorm

U = 2.0 ** -24  # float32 unit roundoff


@pytest.fixture(scope="module")
def legacy(tmp_path_factory, trained_run, calibration) -> dict:
    """The trained tiny model converted the old way ([-1, 1] input), float32 and int8."""
    out = tmp_path_factory.mktemp("legacy")
    old = ConvertSettings("int8", input_convention="signed_unit")
    return {"int8": export_tflite(trained_run.model_path, old, out=out / "int8.tflite",
                                  representative=calibration).path,
            "float": export_tflite(trained_run.model_path, ConvertSettings("float", input_convention="signed_unit"),
                                   out=out / "float.tflite").path}


@pytest.fixture(scope="module")
def all_levels_png(tmp_path_factory) -> Path:
    """A 71x71 RGB image holding every pixel value 0..255 in every channel."""
    values = (np.arange(71 * 71 * 3) % 256).astype(np.uint8).reshape(71, 71, 3)
    path = tmp_path_factory.mktemp("levels") / "levels.png"
    Image.fromarray(values).save(path)
    return path


def _fed(model: Path, png: Path) -> tuple[np.ndarray, object]:
    """What validate's runner sets as the model's input for ``png`` (its own path: decode, convention, quantize)."""
    pixels, _ = load_item(Item(png, None), PreprocessSpec(size=71))
    runner = TfliteRunner(model, workers=1)
    try:
        runner.predict_pixels(pixels[None])
        interpreter = runner._pool.get()
        return interpreter.get_tensor(runner._in["index"])[0], runner
    finally:
        runner.close()


def test_the_256_pixel_values_are_256_input_levels(trained_tflite, legacy, all_levels_png):
    """docs/converting.md's figure: 215 levels before (float32 arithmetic), 256 after, through validate's path."""
    pixels = np.asarray(Image.open(all_levels_png))
    fed, runner = _fed(trained_tflite["int8"], all_levels_png)
    assert runner.convention == "pixels" and fed.dtype == np.uint8
    assert np.array_equal(fed, pixels) and len(np.unique(fed)) == 256
    # Inside the model, the uint8 -> int8 QUANTIZE gives p - 128: still 256 levels, no rounding anywhere.
    model_bytes = trained_tflite["int8"].read_bytes()
    interpreter = open_interpreter(model_bytes, preserve_all_tensors=True)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], fed[None])
    interpreter.invoke()
    ops = interpreter._get_ops_details()
    first = next(op for op in ops if op["op_name"] == "QUANTIZE" and
                 interpreter.get_input_details()[0]["index"] in op["inputs"])
    inside = interpreter.get_tensor(int(first["outputs"][0]))[0]
    assert inside.dtype == np.int8 and np.array_equal(inside.astype(int), pixels.astype(int) - 128)

    # The old path: p / 127.5 - 1 in float32, quantized at 2/255 with zero point -1 (the [-1, 1] range).
    old_fed, old_runner = _fed(legacy["int8"], all_levels_png)
    s, z = old_runner._in["quantization"]
    assert old_runner.convention == "signed_unit" and s == pytest.approx(2 / 255) and z == -1
    assert len(np.unique(old_fed)) == 215
    assert len(np.unique(quantize(scale(np.arange(256, dtype=np.uint8)), np.int8, 2 / 255, -1))) == 215


def fold_input_scaling(model):
    stem = find_stem(model)
    assert isinstance(stem, Stem), stem
    return fold_stem(model, stem)


def _plan(model) -> tuple[str, str | None] | str:
    stem = find_stem(model)
    return stem if isinstance(stem, str) else (stem.conv, stem.bn)


def test_the_folded_stem_matches_within_float_rounding():
    """conv(p / 127.5 - 1; w) = conv(p; w / 127.5) - sum(w): equal up to a bound derived from float32 rounding."""
    import keras

    model = spread_batchnorm(build_xception(**TINY))
    folded = fold_input_scaling(model)
    p = np.random.default_rng(1).integers(0, 256, (4, 71, 71, 3)).astype(np.uint8)
    stem = [keras.Model(m.input, m.get_layer("block1_conv1_bn").output) for m in (model, folded)]
    a = np.asarray(stem[0](scale(p)), dtype=np.float64)
    b = np.asarray(stem[1](p.astype(np.float32)), dtype=np.float64)

    w = np.asarray(model.get_layer("block1_conv1").get_weights()[0], dtype=np.float64)
    gamma, beta, mean, var = (np.asarray(v, dtype=np.float64) for v in model.get_layer("block1_conv1_bn").get_weights())
    eps = model.get_layer("block1_conv1_bn").epsilon
    k = np.abs(gamma) / np.sqrt(var + eps)  # the BatchNorm's per-channel gain
    n = w.shape[0] * w.shape[1] * w.shape[2]  # terms in each dot product
    # Magnitudes the two paths round: |w.x| <= sum|w| (|x| <= 1) and |w/127.5 . p| <= 2 sum|w|; the folded mean
    # carries |sum w|; each float32 sum of n products errs by at most n*u of its absolute terms; the BatchNorm
    # adds a few roundings of its operands (and the kernel's own rounding to float32 one more u).
    magnitude = k * (3 * np.abs(w).sum(axis=(0, 1, 2)) + np.abs(mean) + np.abs(w.sum(axis=(0, 1, 2)))) + np.abs(beta)
    bound = (n + 8) * U * magnitude
    diff = np.abs(a - b).max(axis=(0, 1, 2))
    assert (diff <= bound).all(), (diff / bound).max()
    folded_w = folded.get_layer("block1_conv1").get_weights()[0]
    assert np.allclose(folded_w * 127.5, w, rtol=1e-6) and not np.allclose(folded_w, w)  # really folded

    # The whole model: probabilities agree to float rounding propagated through the network.
    assert np.abs(np.asarray(model(scale(p))) - np.asarray(folded(p.astype(np.float32)))).max() < 1e-4


def test_the_bias_is_folded_where_the_convolution_has_one():
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=True, bias_initializer="random_normal", name="stem")(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    assert _plan(model) == ("stem", None)
    p = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    w, b = (np.asarray(v, dtype=np.float64) for v in model.get_layer("stem").get_weights())
    # per output channel as for the stem below, then through the mean over positions (which only averages)
    bound = (27 + 8) * U * (3 * np.abs(w).sum(axis=(0, 1, 2)) + np.abs(b) + np.abs(w.sum(axis=(0, 1, 2))))
    folded = fold_input_scaling(model)
    got = np.abs(np.asarray(model(scale(p))) - np.asarray(folded(p.astype(np.float32))))
    assert (got <= bound).all()
    assert np.allclose(folded.get_layer("stem").get_weights()[1], b - w.sum(axis=(0, 1, 2)), rtol=1e-6)


def test_the_stem_is_read_from_the_keras_model():
    import keras

    assert _plan(build_xception(**TINY)) == ("block1_conv1", "block1_conv1_bn")

    def user(padding="valid", first=None, bias=False):
        inputs = keras.Input((32, 32, 3))
        layer = first or keras.layers.Conv2D(8, 3, padding=padding, use_bias=bias, name="c")
        x = keras.layers.BatchNormalization(name="bn")(layer(inputs))
        return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))

    same = find_stem(user("same"))
    assert same.padded and not same.exact and same.zero_pixel == (127.5,) * 3 and same.pads == ((1, 1), (1, 1))
    assert not find_stem(user()).padded
    depthwise = find_stem(user(first=keras.layers.DepthwiseConv2D(3, name="d")))
    assert isinstance(depthwise, str) and "DepthwiseConv2D" in depthwise
    # A saved (JSON) config and tf_keras's list-style inbound nodes wire the same graph.
    assert layer_graph(json.loads(json.dumps(user().get_config())))[1]["c"] == ["bn"]
    tf_keras_style = {"layers": [
        {"class_name": "InputLayer", "config": {"name": "in"}, "inbound_nodes": []},
        {"class_name": "Conv2D", "config": {"name": "c", "padding": "valid", "use_bias": False,
                                            "activation": "linear"}, "inbound_nodes": [[["in", 0, 0, {}]]]},
        {"class_name": "BatchNormalization", "config": {"name": "bn", "axis": [3]},
         "inbound_nodes": [[["c", 0, 0, {}]]]}]}
    assert layer_graph(tf_keras_style)[1:] == ({"in": ["c"], "c": ["bn"], "bn": []}, ["in"])


@pytest.fixture(scope="module")
def same_padding_model(tmp_path_factory) -> Path:
    """A user model whose first convolution pads ('same'): a zero pad in [-1, 1] is pixel 127.5."""
    import keras

    inputs = keras.Input((71, 71, 3), name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(name="stem_bn")(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    path = tmp_path_factory.mktemp("user") / "user.keras"
    spread_batchnorm(keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))).save(path)
    return path


def test_a_same_padding_model_takes_pixels_padded_with_a_stated_pixel(tmp_path, same_padding_model, calibration):
    """Its zero pad in [-1, 1] is pixel 127.5: the int8 model takes uint8 pixels padded with pixel 128, and the
    manifest says so with the effect measured on the calibration images."""
    result = export_tflite(same_padding_model, ConvertSettings("int8"), out=tmp_path / "m.tflite",
                           representative=calibration)
    record = result.manifest["input_convention"]
    assert record["name"] == "pixels" and "approximation" in record["why"] and "pixel 128" in record["why"]
    assert record["stem"]["pad_pixel"] == [128] * 3 and record["stem"]["zero_pad_pixel"] == [127.5] * 3
    assert record["stem"]["effect"]["images"] == 32 and 0 <= record["stem"]["effect"]["top1_agreement"] <= 1
    io = result.manifest["io"]
    assert io["inputs"][0]["dtype"] == "uint8" and io["outputs"][0]["dtype"] == "uint8"


def test_an_unusual_first_layer_keeps_signed_unit_with_a_uint8_output(tmp_path, calibration):
    """No convolution to fold into: [-1, 1] int8 input as before, with the reason; asked for pixels, refused.
    The output is uint8 all the same (what MediaPipe's clients take)."""
    import keras

    inputs = keras.Input((71, 71, 3))
    x = keras.layers.DepthwiseConv2D(3, name="dw")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    path = tmp_path / "dw.keras"
    keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x)).save(path)
    result = export_tflite(path, ConvertSettings("int8"), out=tmp_path / "m.tflite", representative=calibration)
    record = result.manifest["input_convention"]
    assert record["name"] == "signed_unit" and "DepthwiseConv2D, not a Conv2D" in record["why"]
    assert record["normalization"] == {"mean": 127.5, "std": 127.5}
    io = result.manifest["io"]
    assert io["inputs"][0]["dtype"] == "int8" and io["outputs"][0]["dtype"] == "uint8"
    assert result.manifest["preprocessing"]["fingerprint"] == PreprocessSpec(71).fingerprint
    with pytest.raises(ConversionError, match="DepthwiseConv2D") as refused:
        export_tflite(path, ConvertSettings("int8", input_convention="pixels"), out=tmp_path / "p.tflite",
                      representative=calibration)
    assert refused.value.remedy == Remedy.SIGNED_UNIT_INPUT
    assert not (tmp_path / "p.tflite").exists()


def test_the_pixel_input_range_is_pinned_not_calibrated(tmp_path, tiny_keras_path):
    """Calibration images spanning only pixels 60..190 still give an input of scale 1 over 0..255."""
    from calibrate.dataset import build_calibration_set

    rng = np.random.default_rng(3)
    folder = tmp_path / "narrow"
    folder.mkdir()
    for i in range(6):
        np.save(folder / f"s{i}.npy", rng.integers(60, 191, (71, 71, 3)).astype(np.uint8))
    cal = build_calibration_set(folder, PreprocessSpec(71), size=6)
    for convention, (dtype, zero) in {"pixels": ("uint8", 0), "pixels_int8": ("int8", -128)}.items():
        result = export_tflite(tiny_keras_path, ConvertSettings("int8", input_convention=convention),
                               out=tmp_path / f"{convention}.tflite", representative=cal)
        (inp,), (out,) = result.manifest["io"]["inputs"], result.manifest["io"]["outputs"]
        assert (inp["dtype"], inp["scale"], inp["zero_point"]) == (dtype, 1.0, zero)
        assert out["dtype"] == dtype and out["scale"] == 1 / 256  # the softmax's fixed scale, exact in both
        assert result.manifest["calibration"]["method"]["input_range"] == [0.0, 255.0]
        assert result.manifest["preprocessing"]["input_convention"] == convention


def test_old_models_and_manifests_still_validate(tmp_path, trained_run, legacy, trained_tflite, digits):
    """An int8 and a float model with [-1, 1] input and manifests from before conventions (or none) validate
    as before: the same numbers as feeding p / 127.5 - 1 by hand; pixel models validate alongside them."""
    from ai_edge_litert.interpreter import Interpreter

    val = tmp_path / "val"
    for class_dir in sorted(Path(digits["val"]).iterdir()):
        (val / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:3]:
            shutil.copy2(f, val / class_dir.name / f.name)
    old = {}
    for mode in ("int8", "float"):
        target = tmp_path / f"old_{mode}.tflite"
        shutil.copy2(legacy[mode], target)
        manifest = json.loads(manifest_path_for(legacy[mode]).read_text())
        for key in ("input_convention",):
            manifest.pop(key)
        manifest["preprocessing"].pop("input_convention")
        manifest["settings"].pop("input_convention")
        manifest_path_for(target).write_text(json.dumps(manifest))
        old[mode] = target
    stripped = tmp_path / "stripped_float.tflite"  # no metadata; the old manifest beside it
    stripped.write_bytes(_without_metadata(legacy["float"].read_bytes()))
    stripped_manifest = json.loads(manifest_path_for(old["float"]).read_text())
    stripped_manifest["output"].update(sha256=hashlib.sha256(stripped.read_bytes()).hexdigest(),
                                       bytes=stripped.stat().st_size)
    manifest_path_for(stripped).write_text(json.dumps(stripped_manifest))
    bare = tmp_path / "bare_float.tflite"  # no metadata, no manifest: what a model from before all this is
    bare.write_bytes(_without_metadata(legacy["float"].read_bytes()))

    files = sorted(val.rglob("*.png"))
    pixels = np.stack([pixels_for(f, PreprocessSpec(71)) for f in files])
    it = Interpreter(model_path=str(old["int8"]))
    it.allocate_tensors()
    (inp,), (outp,) = it.get_input_details(), it.get_output_details()
    by_hand = []
    for x in scale(pixels):
        it.set_tensor(inp["index"], quantize(x[None], np.int8, *inp["quantization"]))
        it.invoke()
        by_hand.append(it.get_tensor(outp["index"])[0].argmax())

    report = validate(trained_run.model_path, old["int8"], val, tmp_path / "r_int8", layer_samples=2).report
    assert report["candidate"]["input_convention"] == "signed_unit"
    assert report["candidate"]["input_convention_from"] == "input tensor quantization"
    labels = json.loads((trained_run.run_dir / "labels.json").read_text())["classes"]
    truth = np.array([labels.index(f.parent.name) for f in files])
    assert report["top1_quant"] == pytest.approx(np.mean(np.array(by_hand) == truth))
    assert report["layers"]["status"] == "ok"
    md = (tmp_path / "r_int8" / "report.md").read_text()
    assert "| input convention reference / candidate | signed_unit / signed_unit |" in md

    for candidate, how in ((old["float"], "NormalizationOptions metadata"),
                           (stripped, "manifest from before input conventions"),
                           (bare, "assumed: a float input, no metadata or manifest says otherwise"),
                           (trained_tflite["float"], "NormalizationOptions metadata")):
        r = validate(trained_run.model_path, candidate, val, tmp_path / candidate.stem, layer_samples=0).report
        assert r["candidate"]["input_convention_from"] == how
        # float32 against the Keras model: only float rounding apart when each is fed its own convention
        # (fed [-1, 1] as pixels, or the reverse, the outputs would be unrelated)
        assert r["agreement"] == 1.0 and r["prob_max_abs_diff"] < 1e-4, (candidate, r["prob_max_abs_diff"])
    assert r["candidate"]["input_convention"] == "pixels"


def _without_metadata(data: bytes) -> bytes:
    """The model with its metadata entries dropped (buffers left in place): a model no writer described."""
    model = flatbuffers.read(data)
    model.metadata = None
    return flatbuffers.write(model)


def test_float_models_take_pixels_bit_for_bit(trained_tflite):
    """The float model's input is what a client computes with mean 0 / std 1: p itself, exactly."""
    manifest = json.loads(trained_tflite["float"].with_name("float.manifest.json").read_text())
    assert manifest["input_convention"]["normalization"] == {"mean": 0.0, "std": 1.0}
    p = np.arange(256, dtype=np.uint8)
    assert np.array_equal(model_input(p, "pixels"), (p.astype(np.float32) - np.float32(0)) / np.float32(1))
    # With mean 127.5 / std 127.5 a client's (p - 127.5) / 127.5 is not our p / 127.5 - 1 for half the values.
    assert np.sum(scale(p) != (p.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)) == 128


def test_the_cli_refuses_conventions_a_mode_cannot_take(tmp_path, tiny_keras_path):
    """Usage errors (exit 2) before anything loads: pixels-int8 is --int8 with integer I/O only, and int16x8
    has no uint8 input."""
    from tests.conftest import run_cli

    for args, words in ((["--fp16", "--input-convention", "pixels-int8"], "int8 models with integer input"),
                        (["--int8", "--float-io", "--input-convention", "pixels-int8"], "int8 models with integer input"),
                        (["--int16x8", "--input-convention", "pixels"], "needs float input and output")):
        proc = run_cli("convert", tiny_keras_path, *args, "--out", tmp_path / "m.tflite", cwd=tmp_path)
        assert proc.returncode == 2 and words in proc.stderr and "(--input-convention)" in proc.stderr, proc.stderr
    assert not (tmp_path / "m.tflite").exists()


def _rescaled_model(scale_by: float, offset: float):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((9, 9, 3))
    x = keras.layers.Rescaling(scale_by, offset=offset, name="rescale")(inputs)
    x = keras.layers.Conv2D(4, 3, name="stem_conv")(x)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def test_a_rescaling_back_to_pixels_makes_a_signed_unit_model_and_folds_to_the_identity():
    """Rescaling(127.5, offset=127.5) turns a [-1, 1] input back into the 0..255 a network was trained on: the
    model expects [-1, 1], not pixels, and with the [-1, 1] scaling in front the two cancel exactly."""
    from pipeline.model.stem import input_domain

    model = _rescaled_model(127.5, 127.5)
    assert input_domain(model) == "signed_unit"
    stem = find_stem(model)
    assert isinstance(stem, Stem) and stem.domain == "signed_unit" and stem.normalizing == ("rescale",)
    assert stem.scale == (1.0,) * 3 and stem.offset == (0.0,) * 3  # 127.5 / 127.5 and 127.5 - 127.5: exact
    pixels = np.random.default_rng(0).integers(0, 256, (4, 9, 9, 3)).astype(np.float32)
    folded = fold_stem(model, stem)
    np.testing.assert_allclose(np.asarray(folded(pixels)), np.asarray(model(pixels / 127.5 - 1)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale_by, offset", [(1 / 255, 0.0), (1 / 127.5, -1.0)])
def test_a_rescaling_of_pixels_to_a_normalized_range_takes_pixels(scale_by, offset):
    from pipeline.model.stem import input_domain

    model = _rescaled_model(scale_by, offset)
    stem = find_stem(model)
    assert input_domain(model) == "pixels" and isinstance(stem, Stem) and stem.domain == "pixels"


def test_the_input_domain_is_read_from_the_normalization_even_when_the_stem_cannot_be_folded():
    """A Rescaling back to pixels in front of a nested network (no stem to fold) still makes a [-1, 1] model."""
    import keras

    from pipeline.model.stem import input_domain

    inner = keras.Sequential([keras.Input((9, 9, 3)), keras.layers.Conv2D(4, 3), keras.layers.Flatten()], name="cnn")
    for scale_by, offset, domain in ((127.5, 127.5, "signed_unit"), (1 / 255, 0.0, "pixels")):
        inputs = keras.Input((9, 9, 3))
        model = keras.Model(inputs, inner(keras.layers.Rescaling(scale_by, offset=offset)(inputs)))
        assert isinstance(find_stem(model), str) and input_domain(model) == domain

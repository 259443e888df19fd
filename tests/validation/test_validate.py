"""`xedge validate` and `xedge diff` on the trained tiny digits model: real models, subprocesses, Chromium.

Sample counts are kept small (6 images per class) so the whole file runs in
well under three minutes on 2 cores; the shared session fixtures provide the
trained model and its float/int8 .tflite files.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.artifacts import manifest_path_for, sha256_file
from pipeline.core.errors import ValidationError
from pipeline.core.preprocessing import PreprocessSpec, pixels_for, preprocess_file, scale
from pipeline.validation.report_html import CANDIDATE_COLOUR, REFERENCE_COLOUR
from pipeline.validation.validate import Budgets, validate
from tests.browser import chromium as _chromium
from tests.conftest import invoke_cli, labeled_subset, run_cli

PER_CLASS = 6


@pytest.fixture(scope="module")
def val_subset(tmp_path_factory, digits) -> Path:
    """A labeled folder with the first few held-out images of each class."""
    return labeled_subset(digits["val"], tmp_path_factory.mktemp("val_subset"), PER_CLASS)


def _damage(src: Path, dst: Path, amount: int = 40, seed: int = 0) -> Path:
    """A copy of an int8 .tflite with every constant int8 weight buffer perturbed."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(src))
    rng = np.random.default_rng(seed)
    touched = 0
    for tensor in model.subgraphs[0].tensors:
        buffer = model.buffers[tensor.buffer]
        if tensor.type == schema.TensorType.INT8 and buffer.data is not None and len(buffer.data) > 64:
            w = np.frombuffer(bytes(bytearray(buffer.data)), dtype=np.int8).astype(np.int16)
            w = np.clip(w + rng.integers(-amount, amount + 1, w.shape), -127, 127).astype(np.int8)
            buffer.data = np.frombuffer(w.tobytes(), dtype=np.uint8)
            touched += 1
    assert touched > 10
    flatbuffer_utils.write_model(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def damaged_int8(tmp_path_factory, trained_tflite) -> Path:
    return _damage(trained_tflite["int8"], tmp_path_factory.mktemp("damaged") / "damaged_int8.tflite")


@pytest.fixture(scope="module")
def damaged_report(tmp_path_factory, trained_tflite, damaged_int8, val_subset):
    """A report with flips (thumbnails) and layer errors: float .tflite vs a damaged int8 .tflite."""
    return validate(trained_tflite["float"], damaged_int8, val_subset, tmp_path_factory.mktemp("damaged_report"),
                    layer_samples=4)


@pytest.fixture(scope="module")
def int8_cli_run(tmp_path_factory, trained_run, trained_tflite, val_subset):
    out = tmp_path_factory.mktemp("int8_report")
    proc = run_cli("xedge", "validate", trained_run.model_path, trained_tflite["int8"], "--data", val_subset,
                   "--report", out, "--max-top1-drop", "20", "--min-agreement", "0.7", "--max-kl", "0.5",
                   "--layer-samples", "4")
    return proc, out


def test_int8_report_matches_an_independent_recomputation(int8_cli_run, trained_run, trained_tflite, val_subset):
    import keras
    from ai_edge_litert.interpreter import Interpreter

    proc, out = int8_cli_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "XNNPACK" not in proc.stderr
    assert "report.html" in proc.stdout and "PASS top1_drop" in proc.stdout
    report = json.loads((out / "report.json").read_text())

    files = sorted(val_subset.rglob("*.png"))
    classes = json.loads((trained_run.run_dir / "labels.json").read_text())["classes"]
    y = np.array([classes.index(f.parent.name) for f in files])
    pixels = np.stack([pixels_for(f, PreprocessSpec(size=71)) for f in files])
    model = keras.saving.load_model(trained_run.model_path, compile=False)
    p_ref = np.asarray(model(scale(pixels), training=False), dtype=np.float64)  # trained on p / 127.5 - 1
    it = Interpreter(model_path=str(trained_tflite["int8"]))
    it.allocate_tensors()
    (inp,), (outp,) = it.get_input_details(), it.get_output_details()
    assert inp["dtype"] == np.uint8 and inp["quantization"] == (1.0, 0)  # the pixels themselves, nothing to round
    s_out, z_out = outp["quantization"]
    rows = []
    for sample in pixels:
        it.set_tensor(inp["index"], sample[None])
        it.invoke()
        rows.append((it.get_tensor(outp["index"])[0].astype(np.float64) - z_out) * s_out)
    p_q = np.array(rows)
    p_ref, p_q = p_ref / p_ref.sum(1, keepdims=True), p_q / p_q.sum(1, keepdims=True)
    eps = 1e-7
    a, b = np.clip(p_ref, eps, 1), np.clip(p_q, eps, 1)
    a, b = a / a.sum(1, keepdims=True), b / b.sum(1, keepdims=True)
    kl = np.sum(a * np.log(a / b), axis=1)

    n = len(files)
    assert report["samples"] == n == 10 * PER_CLASS
    assert report["top1_float"] == pytest.approx(np.mean(p_ref.argmax(1) == y))
    assert report["top1_quant"] == pytest.approx(np.mean(p_q.argmax(1) == y))
    assert report["top1_drop_pp"] == pytest.approx(100 * (report["top1_float"] - report["top1_quant"]))
    assert report["agreement"] == pytest.approx(np.mean(p_ref.argmax(1) == p_q.argmax(1)))
    assert report["kl_mean"] == pytest.approx(kl.mean(), rel=1e-3, abs=1e-6)
    assert report["kl_max"] == pytest.approx(kl.max(), rel=1e-3, abs=1e-6)
    assert report["flips_total"] == int(np.sum(p_ref.argmax(1) != p_q.argmax(1)))
    assert report["top1_float"] > 0.5  # the tiny model learned something: the comparison means something
    lo, hi = report["top1_drop_ci95_pp"]
    assert lo <= report["top1_drop_pp"] <= hi
    assert set(report["per_class"]) == set(classes)
    assert sum(c["n"] for c in report["per_class"].values()) == n
    assert report["reference"]["sha256"] == sha256_file(trained_run.model_path)
    assert report["candidate"]["sha256"] == sha256_file(trained_tflite["int8"])
    assert report["candidate"]["mode"] == "int8"
    assert report["preprocessing"]["fingerprint"] == PreprocessSpec(size=71).fingerprint
    assert report["data"]["labels_source"] == str(trained_run.run_dir / "labels.json")
    assert report["passed"] and set(report["budgets"]) == {"top1_drop", "agreement", "kl_mean"}
    layers = report["layers"]
    assert layers["status"] == "ok", layers
    assert layers["samples"] == 4 and len(layers["worst"]) == 10
    assert all(e["rmse_over_scale"] >= 0 for e in layers["all"])
    assert any(w.startswith("block") for w in layers["worst"])
    md = (out / "report.md").read_text()
    assert "Verdict: **PASS**" in md and "## Worst layers" in md


@pytest.mark.parametrize("flag,value,name", [("--max-top1-drop", "1", "top1 drop"),
                                             ("--min-agreement", "0.95", "agreement"),
                                             ("--max-kl", "0.05", "kl mean")])
def test_damaged_candidate_trips_each_budget(tmp_path, trained_tflite, damaged_int8, val_subset, flag, value, name):
    """The first budget in a real process (its exit code and stderr as a user gets them); the other two differ
    only in the budget's message and run in-process (CliRunner)."""
    run = run_cli if flag == "--max-top1-drop" else invoke_cli
    proc = run("xedge", "validate", trained_tflite["float"], damaged_int8, "--data", val_subset,
               "--report", tmp_path / "r", flag, value, "--layer-samples", "0")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(rf"budget exceeded: {name}: .* vs budget .* \(over by ", proc.stderr), proc.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())  # the report is still written
    assert report["passed"] is False


def test_damaged_candidate_is_visible_in_the_numbers(damaged_report, trained_tflite):
    r = damaged_report.report
    assert r["top1_drop_pp"] > 10 and r["agreement"] < 0.9 and r["kl_mean"] > 0.1
    assert r["flips"] and {"path", "label", "reference", "candidate", "reference_confidence",
                           "candidate_confidence"} <= set(r["flips"][0])
    assert r["reference"]["kind"] == "tflite" and r["layers"]["status"] == "ok"
    assert r["layers"]["float_model"] == "reference .tflite"


def test_two_float_tflite_models_agree_and_skip_layers(tmp_path, trained_tflite, val_subset):
    result = validate(trained_tflite["float"], trained_tflite["float"], val_subset, tmp_path, limit=20,
                      budgets=Budgets(max_top1_drop_pp=0.0, min_agreement=1.0, max_kl=1e-9))
    r = result.report
    assert result.passed and r["samples"] == 20 and r["agreement"] == 1.0 and r["kl_max"] < 1e-9
    assert r["top1_drop_pp"] == 0.0 and r["mcnemar"]["p_value"] == 1.0
    assert r["layers"]["status"] == "skipped" and "not an integer-quantized" in r["layers"]["reason"]
    assert len({tuple(sorted(c)) for c in [r["per_class"]]}) == 1 and len(r["per_class"]) == 10


def test_unreadable_manifest_beside_a_model_is_an_error(tmp_path, trained_tflite, val_subset):
    """A truncated manifest would switch the sha256 check off without a word: one line, exit 2, the remedy.
    In-process (CliRunner): the message and the exit code are the command's."""
    candidate = tmp_path / "m.tflite"
    shutil.copy(trained_tflite["float"], candidate)
    manifest = manifest_path_for(candidate)
    manifest.write_text('{"schema": 1, "output": {"sha256": "abc')
    args = ["xedge", "validate", trained_tflite["float"], candidate, "--data", val_subset, "--report", tmp_path / "r",
            "--limit", "10", "--layer-samples", "0"]
    proc = invoke_cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: cannot check the integrity of {candidate}: its manifest {manifest} is "
                               "unreadable (not valid JSON"), lines[0]
    assert lines[0].endswith("; regenerate it (rerun convert) or remove it"), lines[0]
    assert not (tmp_path / "r").exists()
    manifest.unlink()  # the remedy the message names
    assert invoke_cli(*args).returncode == 0


def test_unlabeled_flat_folder_gives_agreement_only(tmp_path, trained_tflite, val_subset):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted(val_subset.rglob("*.png"))[::3]):
        shutil.copy2(f, flat / f"{i:03d}.png")
    (flat / "notes.txt").write_text("not an image")
    result = validate(trained_tflite["float"], trained_tflite["int8"], flat, tmp_path / "r", layer_samples=0)
    r = result.report
    assert r["data"]["labeled"] is False and r["samples"] == 20
    assert r["top1_float"] is None and r["top1_drop_pp"] is None and r["agreement"] > 0.5
    assert r["per_class_by"] == "reference prediction"
    assert any("notes.txt" in s["path"] for s in r["data"]["skipped"])
    with pytest.raises(ValidationError, match="needs labeled data"):
        validate(trained_tflite["float"], trained_tflite["int8"], flat, tmp_path / "r2",
                 budgets=Budgets(max_top1_drop_pp=1.0))


def test_labels_from_labels_json_versus_sorted_folders(tmp_path, trained_run, trained_tflite, val_subset):
    bare = tmp_path / "bare"  # no manifest, no labels.json beside the models
    bare.mkdir()
    ref, cand = shutil.copy2(trained_tflite["float"], bare / "f.tflite"), shutil.copy2(trained_tflite["int8"],
                                                                                        bare / "q.tflite")
    kw = dict(limit=30, layer_samples=0)
    by_folders = validate(ref, cand, val_subset, tmp_path / "a", **kw).report
    assert by_folders["data"]["labels_source"] == "sorted class folder names"

    beside = tmp_path / "run_copy"
    beside.mkdir()
    ref2 = shutil.copy2(ref, beside / "f.tflite")
    shutil.copy2(trained_run.run_dir / "labels.json", beside / "labels.json")
    by_json = validate(ref2, cand, val_subset, tmp_path / "b", **kw).report
    assert by_json["data"]["labels_source"] == str(beside / "labels.json")
    assert by_json["top1_float"] == by_folders["top1_float"]  # digits folders sort like the run's labels

    shifted = json.loads((trained_run.run_dir / "labels.json").read_text())["classes"]
    shifted = shifted[1:] + shifted[:1]  # output i is called class i+1: the mapping must be honoured
    (tmp_path / "shifted.json").write_text(json.dumps({"classes": shifted}))
    by_flag = validate(ref, cand, val_subset, tmp_path / "c", labels=tmp_path / "shifted.json", **kw).report
    assert by_flag["data"]["labels_source"].startswith("--labels")
    assert by_flag["top1_float"] < 0.3 < by_folders["top1_float"]

    (tmp_path / "wrong.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(10)]}))
    with pytest.raises(ValidationError, match="not among the model's labels"):
        validate(ref, cand, val_subset, tmp_path / "d", labels=tmp_path / "wrong.json", **kw)


@pytest.fixture(scope="module")
def nan_keras(tmp_path_factory) -> Path:
    """A tiny Keras model whose classifier weights are NaN."""
    import keras

    inputs = keras.Input((71, 71, 3))
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(inputs)
    outputs = keras.layers.Dense(10, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs)
    kernel, bias = model.get_layer("predictions").get_weights()
    model.get_layer("predictions").set_weights([np.full_like(kernel, np.nan), bias])
    path = tmp_path_factory.mktemp("nan") / "nan.keras"
    model.save(path)
    return path


def test_nan_outputs_and_unusable_data_are_errors_not_passes(tmp_path, nan_keras, trained_tflite, val_subset):
    proc = invoke_cli("xedge", "validate", nan_keras, trained_tflite["float"], "--data", val_subset,
                      "--report", tmp_path / "r", "--limit", "10")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "NaN" in proc.stderr and "reference" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "report.json").exists()

    broken = tmp_path / "broken" / "3"
    broken.mkdir(parents=True)
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (broken / "b.png").write_bytes(b"")
    with pytest.raises(ValidationError, match="no usable images"):
        validate(trained_tflite["float"], trained_tflite["int8"], tmp_path / "broken", tmp_path / "r2")


def _png_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


IMG_CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const marker = document.createElement("div");
  marker.id = "img-check";
  marker.textContent = `images-decoded ${ok}/${imgs.length}`;
  document.body.appendChild(marker);
});
</script>"""


def test_html_report_renders_in_headless_chromium(chromium_bin, tmp_path, damaged_report):
    page = damaged_report.paths["html"]
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained: nothing fetched
    checked = tmp_path / "checked.html"
    checked.write_text(text.replace("</body>", IMG_CHECK + "</body>"))
    dom = _chromium(chromium_bin, "--virtual-time-budget=5000", "--dump-dom", checked.as_uri(),
                    user_dir=tmp_path / "u1")
    found = re.search(r"images-decoded (\d+)/(\d+)", dom.stdout)
    assert found, dom.stdout[-2000:] + dom.stderr[-2000:]
    ok, total = map(int, found.groups())
    flips = min(len(damaged_report.report["flips"]), 48)
    assert total == 4 + flips and ok == total  # per-class, confidence, confusion, layers + thumbnails

    shot = tmp_path / "shot.png"
    _chromium(chromium_bin, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri(),
              user_dir=tmp_path / "u2")
    assert shot.exists(), "chromium wrote no screenshot"
    pixels = _png_pixels(shot).reshape(-1, 3).astype(int)
    assert pixels.std() > 20  # not a blank page

    def share(hex_colour, tol=40):
        rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
        return np.mean(np.abs(pixels - rgb).sum(axis=1) < tol)

    assert share(REFERENCE_COLOUR) > 0.002, "reference bars/histogram not rendered"
    assert share(CANDIDATE_COLOUR) > 0.002, "candidate bars/layer chart not rendered"


def test_diff_of_three_reports(tmp_path, damaged_report, int8_cli_run, trained_tflite, val_subset):
    _, int8_out = int8_cli_run
    float_out = tmp_path / "float"
    validate(trained_tflite["float"], trained_tflite["float"], val_subset, float_out, limit=20)
    (float_out / "latency.json").write_text(json.dumps({"latency_ms": {"p50": 3.21, "p90": 4.0}}))
    reports = [float_out / "report.json", int8_out / "report.json", damaged_report.paths["json"]]
    proc = run_cli("xedge", "diff", *reports, "--html", tmp_path / "diff.html", "--md", tmp_path / "diff.md")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "damaged_int8.tflite" in proc.stdout and "int8.tflite" in proc.stdout
    assert "different reference models" in proc.stderr  # Keras vs .tflite references are flagged
    page = (tmp_path / "diff.html").read_text()
    assert page.count("<tr>") == 4 and "float" in page and "MiB" in page and "3.21 ms (p50)" in page
    md = (tmp_path / "diff.md").read_text().splitlines()
    assert sum(1 for line in md if line.startswith("| ") and "MiB" in line) == 3

    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    proc = run_cli("xedge", "diff", reports[0], bad)
    assert proc.returncode == 2 and "not an xedge validation report" in proc.stderr



def test_layer_errors_is_usable_on_its_own(trained_tflite, val_subset):
    from pipeline.validation.layer_error import layer_errors

    float_bytes, int8_bytes = trained_tflite["float"].read_bytes(), trained_tflite["int8"].read_bytes()
    # both models take pixels (the default convention of --float and --int8 here): the float model's input
    inputs = [pixels_for(f, PreprocessSpec(size=71)).astype(np.float32) for f in sorted(val_subset.rglob("*.png"))[:3]]
    errors = layer_errors(float_bytes, int8_bytes, inputs)
    assert len(errors) > 20 and all(e.samples == 3 for e in errors)
    ratios = [e.rmse_over_scale for e in errors]
    assert ratios == sorted(ratios, reverse=True)
    first_conv = next(e for e in errors if e.layer == "block1_conv1")
    assert 0.1 < first_conv.rmse_over_scale < 2.0  # near rounding noise (0.29) this early in the network
    assert {e.op for e in errors} >= {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
    with pytest.raises(ValueError, match="no quantized tensor"):
        layer_errors(float_bytes, float_bytes, inputs)


def test_a_failing_layer_step_is_reported_and_the_rest_stands(tmp_path, monkeypatch, trained_tflite, val_subset):
    import pipeline.validation.validate

    def broken(*args, **kwargs):
        raise RuntimeError("tensor 12 is not preserved")  # how upstream's debugger breaks (tensorflow#86949)

    monkeypatch.setattr(pipeline.validation.validate, "layer_errors", broken)
    r = validate(trained_tflite["float"], trained_tflite["int8"], val_subset, tmp_path, limit=10).report
    assert r["layers"]["status"] == "failed" and "not preserved" in r["layers"]["reason"]
    assert r["samples"] == 10 and r["agreement"] is not None
    assert "Per-layer errors failed" in (tmp_path / "report.html").read_text()


def _thousand_classes(calibration):
    """A tiny Xception with 1000 softmax outputs, spread like a real classifier's.

    Untrained, its outputs are flat (an int8 softmax rounds 1/1000 to zero), so
    the classifier is set by hand: a seeded bias (10 favoured classes, 990 that
    share the rest of the mass in probabilities under 1/512) and the trained
    kernel scaled so the image moves each logit by about 1.5, measured on the
    calibration images of this machine.
    """
    import keras

    from pipeline.model.xception import build_xception

    keras.utils.set_random_seed(0)  # the same untrained network whichever tests ran before
    model = build_xception(input_size=71, classes=1000, width=0.25, middle_blocks=1)
    x = np.stack([calibration.inputs(i) for i in range(len(calibration))])
    features = keras.Model(model.input, model.get_layer("avg_pool").output)(x).numpy().astype(np.float64)
    kernel, _ = model.get_layer("predictions").get_weights()
    kernel = kernel.astype(np.float64) * 1.5 / np.std(features @ kernel, axis=0).mean()
    bias = np.random.default_rng(0).normal(0.0, 1.5, 1000)
    bias[:10] += 5.0
    bias -= (features @ kernel).mean(axis=0)
    model.get_layer("predictions").set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return model


def _tflite_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    """Dequantized outputs, fed the way every runner feeds a .tflite (pipeline.core.preprocessing.quantize)."""
    from ai_edge_litert.interpreter import Interpreter

    from pipeline.core.preprocessing import dequantize, quantize

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    rows = []
    for sample in x:
        it.set_tensor(inp["index"], quantize(sample[None], inp["dtype"], *inp["quantization"]))
        it.invoke()
        rows.append(dequantize(it.get_tensor(out["index"])[0], *out["quantization"]))
    return np.array(rows, dtype=np.float64)


def _kl(p, q, eps=1e-7):
    a, b = np.clip(p, eps, 1), np.clip(q, eps, 1)
    a, b = a / a.sum(1, keepdims=True), b / b.sum(1, keepdims=True)
    return np.sum(a * np.log(a / b), axis=1)


def _cosine(p, q):
    return np.sum(p * q, 1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(q, axis=1))


def test_thousand_class_int8_softmax_is_read_as_probabilities(tmp_path, calibration, val_subset):
    """Issue 14, item 10: an int8 softmax over 1000 classes does not sum to 1; it must not get a second softmax."""
    from pipeline.conversion.export import ConvertSettings, export_tflite

    folder = tmp_path / "imagenet_like"
    folder.mkdir()
    names = [str(d) for d in range(10)] + [f"class_{i}" for i in range(10, 1000)]
    (folder / "labels.json").write_text(json.dumps({"classes": names}))
    _thousand_classes(calibration).save(folder / "model.keras")
    # [-1, 1] input: _tflite_outputs below feeds the preprocessed inputs (the output side is what is tested);
    # its output is uint8 (every int8 model's is), so a QUANTIZE follows the SOFTMAX
    int8 = export_tflite(folder / "model.keras", ConvertSettings("int8", input_convention="signed_unit"),
                         out=folder / "model_int8.tflite", representative=calibration).path
    r = validate(folder / "model.keras", int8, val_subset, tmp_path / "r", layer_samples=0).report

    files = sorted(val_subset.rglob("*.png"))
    x = np.stack([preprocess_file(f, PreprocessSpec(size=71)) for f in files])
    import keras

    p_ref = np.asarray(keras.saving.load_model(folder / "model.keras")(x, training=False), dtype=np.float64)
    p_q = _tflite_outputs(int8, x)
    assert p_q.shape == (len(files), 1000) and p_q.sum(1).min() < 0.95  # the rows a value test called logits

    assert r["outputs"] == {"reference": "probabilities (the output layer 'predictions' has a softmax activation)",
                            "candidate": "probabilities (SOFTMAX op produces the output (through QUANTIZE))"}
    assert r["data"]["labels_source"] == str(folder / "labels.json") and r["samples"] == len(files)
    edges = np.linspace(0, 1, 21)
    assert r["confidence"]["candidate"]["counts"] == np.histogram(p_q.max(1), bins=edges)[0].tolist()
    index = {str(f): i for i, f in enumerate(files)}
    for flip in r["flips"]:
        assert flip["candidate_confidence"] == p_q[index[flip["path"]]].max()  # the dequantized output itself
    assert r["agreement"] == pytest.approx(np.mean(p_ref.argmax(1) == p_q.argmax(1)))
    assert r["kl_mean"] == pytest.approx(_kl(p_ref, p_q).mean(), rel=1e-3)
    assert r["prob_max_abs_diff"] == pytest.approx(np.abs(p_ref - p_q).max(), abs=1e-5)
    assert r["prob_cosine_mean"] == pytest.approx(_cosine(p_ref, p_q).mean(), rel=1e-4)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| candidate outputs | probabilities (SOFTMAX op produces the output (through QUANTIZE)) |" in md


def test_logits_model_gets_softmax_even_when_its_outputs_sum_to_one(tmp_path, val_subset):
    """A model without softmax whose outputs happen to look like probabilities is still a logits model."""
    import keras

    from pipeline.conversion.export import ConvertSettings, export_tflite

    inputs = keras.Input((71, 71, 3))
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(inputs)
    outputs = keras.layers.Dense(10, name="predictions")(pooled)  # no activation
    model = keras.Model(inputs, outputs)
    bias = np.full(10, 0.01, dtype=np.float32)
    bias[3] = 0.91  # rows near [0.01, .., 0.91, .., 0.01]: non-negative, summing to 1 +- 0.01
    kernel = np.random.default_rng(0).normal(0.0, 0.002, (3, 10)).astype(np.float32)
    model.get_layer("predictions").set_weights([kernel, bias])
    model.save(tmp_path / "logits.keras")
    tfl = export_tflite(tmp_path / "logits.keras", ConvertSettings("float"), out=tmp_path / "logits.tflite").path
    r = validate(tmp_path / "logits.keras", tfl, val_subset, tmp_path / "r", layer_samples=0).report

    files = sorted(val_subset.rglob("*.png"))
    x = np.stack([preprocess_file(f, PreprocessSpec(size=71)) for f in files])
    logits = _tflite_outputs(tfl, x)
    assert np.all(np.abs(logits.sum(1) - 1) < 0.05) and logits.min() >= 0  # what a value test took for probabilities
    assert r["outputs"] == {
        "reference": "logits (the output layer 'predictions' has activation 'linear', not softmax or sigmoid; "
                     "softmax applied)",
        "candidate": "logits (the output comes from FULLY_CONNECTED, not from a SOFTMAX or LOGISTIC op; "
                     "softmax applied)"}
    exp = np.exp(logits - logits.max(1, keepdims=True))
    confidence = (exp / exp.sum(1, keepdims=True)).max(1)
    assert 0.2 < confidence.min() and confidence.max() < 0.25  # softmax of one 0.91 among nine 0.01: 0.215
    assert r["confidence"]["candidate"]["counts"] == np.histogram(confidence, bins=np.linspace(0, 1, 21))[0].tolist()
    assert r["agreement"] == 1.0 and r["kl_max"] < 1e-6

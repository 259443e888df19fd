"""`convert --max-drop`: accuracy budgets met by keeping the most harmful layers in float.

The sensitive model is the trained tiny digits model with an outlier channel
planted inside two separable convs: depthwise channel 0 scaled up by
``OUTLIER``, the pointwise weights of that channel scaled down by the same
factor. The float model computes the same function, but the depthwise output
tensor now has a range ``OUTLIER`` times too wide for per-tensor int8
activations, which wipes out the other channels of that tensor. Only keeping
those layers in float restores accuracy.

For int16x8 the same plant needs a far larger factor (``OUTLIER_INT16``):
16-bit activations absorb a 300x outlier. There the layers are kept float by
splicing them in from the float32 conversion (``pipeline.tflite.splice``), which is
also how an int8 model keeps layers in int16 (``fallback="int16"``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.conversion.export import ConvertSettings, convert_bytes, convert_model
from pipeline.tflite.contents import inspect_tflite
from tests.conftest import invoke_cli, run_cli

OUTLIER = 300.0
OUTLIER_INT16 = 1e5  # int16x8 alone: 70 pp drop on 100 digits (1 pp on the unplanted model)
PLANTED = ("block3_sepconv1", "block5_sepconv2")
EVAL_LIMIT = 150  # 15 per class: 100 for the search, 50 held out (one image there is 2 pp)
BUDGET = 4.0  # pp: room for one or two images on which any trained int8 digits model may differ from float


def _plant(trained_run, folder: Path, factor: float) -> Path:
    import keras

    model = keras.models.load_model(trained_run.model_path)
    for name in PLANTED:
        layer = model.get_layer(name)
        depthwise, pointwise, *rest = layer.get_weights()
        depthwise[..., 0, :] *= factor
        pointwise[:, :, 0, :] /= factor
        layer.set_weights([depthwise, pointwise, *rest])
    model.save(folder / "model.keras")
    shutil.copy2(trained_run.run_dir / "labels.json", folder / "labels.json")
    return folder / "model.keras"


@pytest.fixture(scope="module")
def sensitive_model(tmp_path_factory, trained_run) -> Path:
    return _plant(trained_run, tmp_path_factory.mktemp("sensitive"), OUTLIER)


@pytest.fixture(scope="module")
def int16_sensitive_model(tmp_path_factory, trained_run) -> Path:
    return _plant(trained_run, tmp_path_factory.mktemp("sensitive16"), OUTLIER_INT16)


def test_private_quantizer_hook_is_pinned_and_works(trained_run, calibration):
    """Fails on a TensorFlow upgrade that moves or changes the private quantizer entry point."""
    import tensorflow as tf

    from pipeline.conversion.converter_hooks import SUPPORTED_TF, denylist_supported

    assert tf.__version__.startswith(SUPPORTED_TF), "re-check pipeline/conversion/converter_hooks.py against this TensorFlow"
    assert denylist_supported() == (True, "ok")
    from pipeline.model.modelio import load_source

    source = load_source(trained_run.model_path)
    conversion = convert_model(source, ConvertSettings("int8", float_layers=("predictions", "block3_sepconv1")),
                               calibration)
    model, record = conversion.model, conversion.calibration
    info = inspect_tflite(model)
    assert info.op_histogram.get("FULLY_CONNECTED/float32") == 1
    assert info.op_histogram.get("DEPTHWISE_CONV_2D/float32") == 1  # the separable conv's two ops
    assert record.float_layers == ["predictions", "block3_sepconv1"] and len(record.denylisted_nodes or []) == 3
    assert info.inputs[0]["dtype"] == "uint8"  # everything else is the stock converter path


def test_unknown_layer_and_unpinned_tensorflow_are_clear_errors(trained_run, calibration, monkeypatch):
    from pipeline.core.errors import ConversionError
    from pipeline.model.modelio import load_source

    source = load_source(trained_run.model_path)
    with pytest.raises(ConversionError, match="no such layer"):
        convert_bytes(source, ConvertSettings("int8", float_layers=("block99_conv",)), calibration)
    from pipeline.conversion import converter_hooks

    monkeypatch.setattr(converter_hooks, "_tf_version", lambda: "2.99.0")
    with pytest.raises(ConversionError, match="pinned to TensorFlow 2.21"):
        convert_bytes(source, ConvertSettings("int8", float_layers=("predictions",)), calibration)


def test_drop_meter_agrees_with_xedge_validate(trained_run, trained_tflite, digits, tmp_path):
    from pipeline.validation.accuracy_budget import DropMeter
    from pipeline.validation.validate import validate

    meter = DropMeter(trained_run.model_path, digits["val"], limit=60)
    measured = meter.measure(Path(trained_tflite["int8"]).read_bytes(), "all").to_manifest()
    search, held = meter.parts["search"], meter.parts["heldout"]  # 6 images per class: 2 of each held out
    assert len(held) == 20 and sorted([*search, *held]) == list(range(60))
    assert np.bincount(meter.all_labels[held]).tolist() == [2] * 10
    report = validate(trained_run.model_path, trained_tflite["int8"], digits["val"], tmp_path, limit=60,
                      layer_samples=0).report
    for key in ("top1_drop_pp", "top1_quant", "top1_float", "agreement"):
        # DropMeter.measure rounds the drop to 4 decimals
        assert measured[key] == pytest.approx(report[key], abs=5e-5 if key == "top1_drop_pp" else 1e-9), key


def test_budget_already_met_needs_no_fallback(trained_run, calibration, digits, tmp_path):
    from pipeline.validation.accuracy_budget import BudgetSettings, convert_within_budget

    budget = BudgetSettings(BUDGET, digits["val"], eval_limit=EVAL_LIMIT,
                            latency=lambda a, b: pytest.fail("no fallback, no bench"))
    result = convert_within_budget(trained_run.model_path, ConvertSettings("int8"), budget, representative=calibration,
                                   out=tmp_path / "m.tflite")
    assert result.float_layers == [] and result.final["top1_drop_pp"] <= BUDGET
    manifest = json.loads((tmp_path / "m.manifest.json").read_text())
    record = manifest["float_fallback"]
    assert record["layers"] == [] and manifest["settings"]["float_layers"] == []
    assert len(record["steps"]) == 1 and record["reached"] is True and record["latency"] is None
    assert record["final_top1_drop_pp"] <= BUDGET and record["eval"]["images"] == EVAL_LIMIT
    # judged on the 50 held-out images, the interval being metrics.paired_drop_ci of their discordant pairs
    assert record["eval"]["search_images"] == 100 and record["eval"]["heldout_images"] == 50
    assert record["gate"] == {"on": "heldout", "top1_drop_pp": record["heldout_top1_drop_pp"],
                              "reason": record["eval"]["holdout"]}
    assert record["heldout"]["samples"] == 50 and record["heldout_top1_drop_pp"] <= BUDGET
    flips = record["heldout"]["mcnemar"]
    from pipeline.validation.metrics import paired_drop_ci

    ci = paired_drop_ci(flips["reference_only_correct"], flips["candidate_only_correct"], 50)
    assert record["heldout_top1_drop_ci95_pp"] == [round(v, 4) for v in ci] == record["heldout"]["top1_drop_ci95_pp"]
    assert record["final_top1_drop_pp"] == record["steps"][-1]["top1_drop_pp"]  # the search measured these bytes
    assert not inspect_tflite((tmp_path / "m.tflite").read_bytes()).heavy_float_ops


def test_cli_reaches_budget_by_keeping_planted_layers_in_float(sensitive_model, digits, tmp_path):
    out = tmp_path / "sens_int8.tflite"
    proc = run_cli("convert", sensitive_model, "--int8", "--calib", digits["samples"], "--calib-size", 64,
                   "--max-drop", BUDGET, "--eval", digits["val"], "--eval-limit", EVAL_LIMIT, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "sens_int8.manifest.json").read_text())
    record = manifest["float_fallback"]
    steps = [s["top1_drop_pp"] for s in record["steps"]]
    assert steps[0] > 10, steps  # the planted outliers really hurt int8
    assert record["reached"] and record["heldout_top1_drop_pp"] <= BUDGET and steps[-1] <= BUDGET
    # the search measured the model as written, graph rewrites included: the same figure, the same rewrites
    assert record["final_top1_drop_pp"] == steps[-1]
    assert record["steps"][-1]["rewrites"] == [e["name"] for e in manifest["optimizations"] if e["applied"]]
    assert set(record["layers"]) <= set(PLANTED) and record["layers"], record["layers"]
    assert manifest["settings"]["float_layers"] == record["layers"] and manifest["settings"]["allow_float_fallback"]
    left = " ".join(e["output"] for e in manifest["ops"]["left_float"])
    assert all(f"/{layer}_1/" in left for layer in record["layers"])
    assert manifest["optimizations"], "the graph rewrites are applied and checked on the final model"
    assert record["latency"]["all_quantized_p50_ms"] > 0 and record["latency"]["with_fallback_p50_ms"] > 0
    assert "latency cost of the fallback" in proc.stdout and "float layers: " in proc.stdout
    assert "held-out images (95% CI" in proc.stdout and "100 images the search used" in proc.stdout


def test_cli_unreachable_budget_keeps_best_under_distinct_name(sensitive_model, digits, tmp_path):
    out = tmp_path / "sens_int8.tflite"
    # No float layer allowed: over budget whatever model this machine trained (the plant costs > 10 pp).
    proc = run_cli("convert", sensitive_model, "--int8", "--calib", digits["samples"], "--calib-size", 64,
                   "--max-drop", 0.5, "--eval", digits["val"], "--eval-limit", EVAL_LIMIT, "--max-float-layers", 0,
                   "--out", out)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "budget even with 0 layers in float" in errors[0] and "_over_budget.tflite" in errors[0]
    assert not out.exists()
    best = json.loads((tmp_path / "sens_int8_over_budget.manifest.json").read_text())["float_fallback"]
    assert best["reached"] is False and best["layers"] == [] and len(best["steps"]) == 1
    assert best["final_top1_drop_pp"] == best["steps"][0]["top1_drop_pp"] > 0.5


def test_int16x8_is_the_other_lever(sensitive_model, calibration, digits, tmp_path):
    """16-bit activations absorb the planted outliers that int8 cannot; no layer needs to stay float."""
    from pipeline.validation.accuracy_budget import BudgetSettings, convert_within_budget

    result = convert_within_budget(sensitive_model, ConvertSettings("int16x8"),
                                   BudgetSettings(BUDGET, digits["val"], eval_limit=EVAL_LIMIT),
                                   representative=calibration, out=tmp_path / "m16.tflite")
    assert result.float_layers == [] and result.final["top1_drop_pp"] <= BUDGET >= result.heldout["top1_drop_pp"]
    assert inspect_tflite(result.export.model_bytes).inputs[0]["dtype"] == "int16"
    assert np.isfinite(result.final["kl_mean"])


@pytest.fixture(scope="module")
def sensitive_conversions(sensitive_model, calibration) -> dict:
    from pipeline.model.modelio import load_source

    source = load_source(sensitive_model)
    old = "signed_unit"  # the calibration set's own [-1, 1] inputs, fed to each of them below
    return {"source": source, "float": convert_bytes(source, ConvertSettings("float", input_convention=old)),
            **{mode: convert_bytes(source, ConvertSettings(mode, input_convention=old), calibration)
               for mode in ("int8", "int16x8")}}


def test_conversions_of_one_source_name_their_ops_alike(sensitive_conversions):
    """What the splice relies on: float32, int8 and int16x8 have the same ops per layer, by output name."""
    from pipeline.conversion.float_fallback import op_outputs_by_layer

    by_mode = {mode: op_outputs_by_layer(sensitive_conversions[mode]) for mode in ("float", "int8", "int16x8")}
    assert by_mode["float"] == by_mode["int8"] == by_mode["int16x8"]
    assert set(PLANTED) <= set(by_mode["float"]) and len(by_mode["float"]["block3_sepconv1"]) == 2


def _tensor_outputs(model_bytes: bytes, name: str, inputs) -> tuple[np.ndarray, str]:
    """The named tensor (dequantized) for each input, read under XNNPACK, and its stored dtype."""
    from pipeline.tflite.layers import expose_tensors
    from pipeline.tflite.runtime import open_interpreter
    from pipeline.core.preprocessing import dequantize, quantize

    detail = next(d for d in open_interpreter(model_bytes).get_tensor_details() if d["name"] == name)
    interpreter = open_interpreter(expose_tensors(model_bytes, [detail["index"]]))
    inp = interpreter.get_input_details()[0]
    rows = []
    for x in inputs:
        interpreter.set_tensor(inp["index"], quantize(x[None], inp["dtype"], *inp["quantization"]))
        interpreter.invoke()
        rows.append(dequantize(interpreter.get_tensor(detail["index"]), *detail["quantization"]))
    return np.stack(rows), np.dtype(detail["dtype"]).name


DEPTHWISE_OUT = "xception_1/block3_sepconv1_1/separable_conv2d/depthwise1"  # inside the spliced layer


@pytest.mark.parametrize("host_mode,kept_in", [("int8", "float"), ("int16x8", "float"), ("int8", "int16")])
def test_splice_puts_the_donor_layer_in_the_host(sensitive_conversions, calibration, host_mode, kept_in):
    """A planted layer spliced in runs under XNNPACK, computes in the donor's type and tracks the float model."""
    from pipeline.tflite.splice import splice

    source, float_model = sensitive_conversions["source"], sensitive_conversions["float"]
    host = sensitive_conversions[host_mode]
    if (host_mode, kept_in) == ("int8", "float"):  # convert_bytes takes the MLIR denylist here: splice directly
        report: dict = {}
        spliced = splice(host, float_model, ["block3_sepconv1"], record=report)
    else:  # the path ConvertSettings.float_layers takes
        conversion = convert_model(source, ConvertSettings(host_mode, float_layers=("block3_sepconv1",),
                                                           fallback=kept_in, input_convention="signed_unit"),
                                   calibration)
        spliced, record = conversion.model, conversion.calibration
        assert record.fallback_method == "splice" and record.float_layers == ["block3_sepconv1"]
        report = record.splice or {}
    donor_type = "float32" if kept_in == "float" else "int16"
    host_type = "int8" if host_mode == "int8" else "int16"
    assert report["method"] == "splice" and report["donor"] == donor_type and report["ops"] == 2
    # in: DEQUANTIZE (and a QUANTIZE to int16, since LiteRT cannot requantize int8 to int16); out: one QUANTIZE
    assert report["conversion_ops"] == ({"DEQUANTIZE": 1, "QUANTIZE": 1} if kept_in == "float"
                                        else {"DEQUANTIZE": 1, "QUANTIZE": 2})
    info = inspect_tflite(spliced)
    hist = info.op_histogram
    assert hist[f"DEPTHWISE_CONV_2D/{donor_type}"] == 1 and hist[f"CONV_2D/{donor_type}"] == 1
    assert hist[f"DEPTHWISE_CONV_2D/{host_type}"] == inspect_tflite(host).op_histogram[
        f"DEPTHWISE_CONV_2D/{host_type}"] - 1
    assert info.inputs == inspect_tflite(host).inputs and info.outputs == inspect_tflite(host).outputs
    spliced_ops = {e["output"] for e in info.float_ops}
    assert (kept_in == "float") == any("block3_sepconv1_1/" in name for name in spliced_ops)

    inputs = np.stack([calibration.inputs(i) for i in range(12)])
    reference, _ = _tensor_outputs(float_model, DEPTHWISE_OUT, inputs)
    before, _ = _tensor_outputs(host, DEPTHWISE_OUT, inputs)
    after, dtype = _tensor_outputs(spliced, DEPTHWISE_OUT, inputs)
    assert dtype == donor_type

    def error(x):  # relative to the float values, on the channels the outlier squeezes (not channel 0 itself)
        return float(np.sqrt(np.mean((x[..., 1:] - reference[..., 1:]) ** 2)) / np.std(reference[..., 1:]))

    assert error(after) < 0.1, (error(after), error(before))  # measured 0.03-0.05
    if host_mode == "int8":
        assert error(before) > 5 * error(after)  # int8 wipes out the other channels (measured 0.81)
    else:
        assert error(after) <= error(before) * 1.2
    if (host_mode, kept_in) == ("int8", "float"):  # DEQUANTIZE, the float ops and QUANTIZE all run in XNNPACK
        assert _delegate_partitions(spliced) == _delegate_partitions(host)


def _delegate_partitions(model_bytes: bytes) -> int:
    from pipeline.tflite.runtime import open_interpreter

    return sum(op["op_name"] == "DELEGATE" for op in open_interpreter(model_bytes)._get_ops_details())  # noqa: SLF001


def test_splice_errors_name_the_layer(sensitive_conversions):
    from tensorflow.lite.tools import flatbuffer_utils

    from pipeline.core.errors import ConversionError
    from pipeline.tflite.splice import splice

    host, float_model = sensitive_conversions["int16x8"], sensitive_conversions["float"]
    with pytest.raises(ConversionError, match="block99_conv .*no such layer"):
        splice(host, float_model, ["block99_conv"])
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(float_model))
    for tensor in model.subgraphs[0].tensors:  # a donor that computes block3_sepconv1 under other names
        name = tensor.name.decode()
        if name == DEPTHWISE_OUT:
            tensor.name = name.replace("depthwise1", "depthwise_other").encode()
    other = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    with pytest.raises(ConversionError, match="cannot splice layer block3_sepconv1: the donor model computes it"):
        splice(host, other, ["block3_sepconv1"])
    with pytest.raises(ConversionError, match="applies to int8, not int16x8"):
        ConvertSettings("int16x8", fallback="int16")
    from click.testing import CliRunner

    from convert import convert_command

    usage = CliRunner().invoke(convert_command, ["m.keras", "--int16x8", "--fallback", "int16"])
    assert usage.exit_code == 2 and "applies to int8, not int16x8" in usage.output
    assert "(--fallback)" in usage.output


def test_cli_int16x8_budget_keeps_planted_layers_in_float_by_splicing(int16_sensitive_model, digits, tmp_path):
    """In-process (CliRunner): the int8 budget tests above run the real process, exit codes included."""
    out = tmp_path / "sens_int16x8.tflite"
    proc = invoke_cli("convert", int16_sensitive_model, "--int16x8", "--calib", digits["samples"], "--calib-size", 64,
                      "--max-drop", BUDGET, "--eval", digits["val"], "--eval-limit", EVAL_LIMIT, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "sens_int16x8.manifest.json").read_text())
    record = manifest["float_fallback"]
    steps = [s["top1_drop_pp"] for s in record["steps"]]
    assert steps[0] > 10, steps  # int16x8 alone misses the budget on this model
    assert record["reached"] and record["final_top1_drop_pp"] == steps[-1] <= BUDGET
    assert record["heldout_top1_drop_pp"] <= BUDGET
    assert record["method"] == "splice" and record["kept_in"] == "float"
    assert set(record["layers"]) <= set(PLANTED) and record["layers"], record["layers"]
    assert manifest["settings"]["float_layers"] == record["layers"]
    assert manifest["calibration"]["method"]["splice"]["donor"] == "float32"
    left = " ".join(e["output"] for e in manifest["ops"]["left_float"])
    assert all(f"/{layer}_1/" in left for layer in record["layers"])
    assert manifest["io"]["inputs"][0]["dtype"] == "int16"
    assert "float layers: " in proc.stdout and "kept in float" in proc.stderr

    proc = invoke_cli("convert", int16_sensitive_model, "--int16x8", "--calib", digits["samples"], "--calib-size", 64,
                      "--max-drop", BUDGET, "--eval", digits["val"], "--eval-limit", EVAL_LIMIT,
                      "--max-float-layers", 0, "--out", tmp_path / "one.tflite")
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "budget even with 0 layers in float" in errors[0] and "one_over_budget.tflite" in errors[0]


def test_int8_can_keep_layers_in_int16_instead(sensitive_model, calibration, digits, tmp_path):
    """The other lever inside one int8 model: the worst layers in int16x8 (slower than float: see README)."""
    from pipeline.validation.accuracy_budget import BudgetSettings, convert_within_budget

    # the int16 mechanism on the quantizer's own int8 model: bias correction would move the drop each step finds
    result = convert_within_budget(sensitive_model, ConvertSettings("int8", fallback="int16", bias_correction=False),
                                   BudgetSettings(BUDGET, digits["val"], eval_limit=EVAL_LIMIT),
                                   representative=calibration, out=tmp_path / "m.tflite")
    record = result.record
    assert record["reached"] and record["method"] == "splice" and record["kept_in"] == "int16"
    assert set(record["layers"]) <= set(PLANTED) and record["layers"]
    assert record["steps"][0]["top1_drop_pp"] > 10 and result.final["top1_drop_pp"] <= BUDGET
    info = inspect_tflite(result.export.model_bytes)
    assert info.float_ops == [] and info.inputs[0]["dtype"] == "uint8"
    assert info.op_histogram["CONV_2D/int16"] == len(record["layers"])
    assert result.export.manifest["settings"]["fallback"] == "int16"


def test_an_int8_model_xnnpack_refuses_is_written_with_a_warning_and_still_runs(int16_sensitive_model, digits,
                                                                                 tmp_path):
    """A 1e5 outlier gives requantization scales XNNPACK refuses for the whole graph: no traceback, a warning,
    the manifest says so, and bench/validate still measure it (on the builtin kernels). In-process (CliRunner):
    what is checked is what the commands say and write."""
    out = tmp_path / "refused.tflite"
    proc = invoke_cli("convert", int16_sensitive_model, "--int8", "--calib", digits["samples"], "--calib-size", 64,
                      "--out", out)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "XNNPACK delegate refuses this model" in proc.stderr and "--max-drop" in proc.stderr
    xnnpack = json.loads(out.with_name("refused.manifest.json").read_text())["xnnpack"]
    assert xnnpack["partitions"] == 0 and "XNNPACK" in xnnpack["refused"]
    result = tmp_path / "bench.json"
    bench = invoke_cli("xedge", "bench", out, "--runs", 5, "--json", result)
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "refused the model" in bench.stdout
    measured = json.loads(result.read_text())
    assert measured["xnnpack"] is False and "XNNPACK" in measured["xnnpack_refused"]
    assert measured["latency_ms"]["p50"] > 0


# ---------------------------------------------------------------- what is written is what was measured (issue 14)


def _scramble(model_bytes: bytes) -> bytes:
    from tests.tflite.test_optimize import _scramble_classifier

    return _scramble_classifier(model_bytes)[0]


def _as_rewrite(model_bytes: bytes):
    """Bytes already changed, reported as a rewrite named scramble_classifier."""
    from pipeline.tflite.rewrites import RewriteReport

    report = RewriteReport("scramble_classifier")
    report.rewritten.append({"op": "FULLY_CONNECTED"})
    return model_bytes, report


def test_a_rewrite_that_changes_top1_on_the_eval_images_is_left_out(trained_run, calibration, digits, tmp_path,
                                                                    monkeypatch):
    """The rewrite check sees 32 calibration images; a rewrite it passes may still change eval predictions.

    Here the check is made blind (it accepts anything) and a harmful rewrite is added: the search must
    measure the model as written and leave the rewrite out, saying so, instead of writing a model whose
    drop it never measured.
    """
    from pipeline.conversion import rewrite_gate as tflite_optimize  # where optimize_graph finds the rewrites
    from pipeline.validation.accuracy_budget import BudgetSettings, DropMeter, convert_within_budget
    from pipeline.model.modelio import load_source

    blind = {"samples": 32, "top1_agreement": 1.0, "max_abs_quanta": 0, "mean_abs_diff": 0.0, "accepted": True}
    monkeypatch.setattr(tflite_optimize, "check_rewrite", lambda *a, **k: dict(blind))
    monkeypatch.setattr(tflite_optimize, "raise_negligible_add_inputs", lambda b: _as_rewrite(_scramble(b)))
    said: list[str] = []
    result = convert_within_budget(trained_run.model_path, ConvertSettings("int8"),
                                   BudgetSettings(BUDGET, digits["val"], eval_limit=EVAL_LIMIT),
                                   representative=calibration, out=tmp_path / "m.tflite", say=said.append)
    by_name = {e["name"]: e for e in result.export.manifest["optimizations"]}
    scrambled = by_name["scramble_classifier"]
    assert scrambled["applied"] is False and scrambled["check"]["gate"]["eval_top1_changed"] > 0
    assert scrambled["check"]["gate"]["eval_images"] == EVAL_LIMIT
    assert any("scramble_classifier left out" in line for line in said), said
    for entry in by_name.values():  # kept only with no top-1 change on any eval image
        assert entry["applied"] == (entry["check"]["gate"]["eval_top1_changed"] == 0)
    record = result.record
    assert record["reached"] and record["final_top1_drop_pp"] == record["steps"][-1]["top1_drop_pp"] <= BUDGET
    # the manifest's timing covers the whole search: its own measuring, and every conversion it made by stage
    timing = result.export.manifest["timing"]
    assert abs(sum(v for k, v in timing.items() if k != "total_s") - timing["total_s"]) <= 10 * 0.0005 + 1e-9
    assert timing["search_s"] > 0 and timing["calibration_s"] > 0 and timing["quantizer_s"] > 0
    # exact: the written model predicts what the unrewritten quantizer output predicts, on every eval image
    meter = DropMeter(trained_run.model_path, digits["val"], limit=EVAL_LIMIT)
    stock = convert_bytes(load_source(trained_run.model_path), ConvertSettings("int8"), calibration)
    assert (meter.top1(result.export.model_bytes) == meter.top1(stock)).all()


def test_an_over_budget_written_model_is_never_at_the_budget_path(trained_run, calibration, digits, tmp_path,
                                                                 monkeypatch):
    """If the conversion for the output differs from the one measured, the output path gets nothing."""
    from pipeline.conversion import export
    from pipeline.validation.accuracy_budget import BudgetSettings, convert_within_budget
    from pipeline.core.errors import BudgetNotReached

    real = export.convert_model

    def differs(source, settings, *args, **kwargs):  # export_tflite's own conversion, not the search's
        conversion = real(source, settings, *args, **kwargs)
        return replace(conversion, model=_scramble(conversion.model)) if settings.mode == "int8" else conversion

    monkeypatch.setattr(export, "convert_model", differs)
    out = tmp_path / "m.tflite"
    with pytest.raises(BudgetNotReached, match="the written model's top-1 drop"):
        convert_within_budget(trained_run.model_path, ConvertSettings("int8"),
                              BudgetSettings(BUDGET, digits["val"], eval_limit=EVAL_LIMIT),
                              representative=calibration, out=out)
    assert not out.exists() and not (tmp_path / "m.manifest.json").exists()
    kept = json.loads((tmp_path / "m_over_budget.manifest.json").read_text())["float_fallback"]
    assert kept["reached"] is False and kept["gate"]["top1_drop_pp"] > BUDGET


def test_holdout_split_is_a_stratified_third_with_a_stated_minimum():
    from pipeline.validation.accuracy_budget import HOLDOUT_MIN_PER_CLASS, holdout_split

    labels = np.array([0, 1, 0, 1, 0, 1, 0, 2, 2, 2, 1, 0])  # class 0: 5 images, 1: 4, 2: 3
    search, held, note = holdout_split(labels, ["a", "b", "c"])
    assert held.tolist() == [4, 5, 9] and sorted([*search, *held]) == list(range(12))  # each class's 3rd image
    assert "every third image of each class" in note
    search, held, note = holdout_split(np.array([0, 0, 0, 1, 1]), ["a", "b"])
    assert HOLDOUT_MIN_PER_CLASS == 3 and held.size == 0 and search.tolist() == [0, 1, 2, 3, 4]
    assert "class 'b' has 2 eval image(s)" in note and "at least 3 of every class" in note


def test_budget_is_judged_on_the_held_out_images(sensitive_conversions, calibration, digits, tmp_path):
    """An eval folder whose held-out images are exactly those int8 gets wrong: in-sample 0 pp, held out over."""
    from pipeline.validation.accuracy_budget import BudgetSettings, DropMeter, convert_within_budget
    from pipeline.core.errors import BudgetNotReached
    from pipeline.validation.metrics import paired_drop_ci

    model = Path(sensitive_conversions["source"].path)
    meter = DropMeter(model, digits["val"], holdout=False)
    int8 = sensitive_conversions["int8"]  # what the search converts (optimize=False: no rewrite)
    truth, ref, cand = meter.all_labels, meter.all_reference.argmax(1), meter.top1(int8)
    # Search positions: images the two models label alike (right or wrong, never discordant). Held-out
    # position (the third in name order): an image of the class the float model gets right and int8 not.
    alike = iter([meter.items[i].path for i in np.flatnonzero(ref == cand)])
    eval_dir, flips = tmp_path / "eval", 0
    for c, name in enumerate(meter.names):
        lost = [meter.items[i].path for i in np.flatnonzero((truth == c) & (ref == c) & (cand != c))]
        chosen = [next(alike), next(alike), lost[0] if lost else next(alike)]
        flips += bool(lost)
        (eval_dir / name).mkdir(parents=True)
        for k, path in enumerate(chosen):
            shutil.copy2(path, eval_dir / name / f"{k}{path.suffix}")
    assert flips >= 1  # the plant makes int8 lose images in some class (> 10 pp elsewhere)
    out = tmp_path / "m.tflite"
    with pytest.raises(BudgetNotReached, match="held-out eval images the top-1 drop is"):
        # the very conversion the images were chosen with: [-1, 1] input, no rewrite
        convert_within_budget(model, ConvertSettings("int8", optimize=False, input_convention="signed_unit"),
                              BudgetSettings(BUDGET, eval_dir, max_float_layers=0),
                              representative=calibration, out=out, source=sensitive_conversions["source"])
    assert not out.exists()
    record = json.loads((tmp_path / "m_over_budget.manifest.json").read_text())["float_fallback"]
    assert record["final_top1_drop_pp"] == 0.0 and record["reached"] is False
    assert record["heldout_top1_drop_pp"] == pytest.approx(100.0 * flips / len(meter.names))
    assert record["gate"]["on"] == "heldout" and record["gate"]["top1_drop_pp"] == record["heldout_top1_drop_pp"]
    n = len(meter.names)
    assert record["heldout_top1_drop_ci95_pp"] == [round(v, 4) for v in paired_drop_ci(flips, 0, n)]

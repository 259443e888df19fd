"""`convert --max-drop`: accuracy budgets met by keeping the most harmful layers in float.

The sensitive model is the trained tiny digits model with an outlier channel
planted inside two separable convs: depthwise channel 0 scaled up by
``OUTLIER``, the pointwise weights of that channel scaled down by the same
factor. The float model computes the same function, but the depthwise output
tensor now has a range ``OUTLIER`` times too wide for per-tensor int8
activations, which wipes out the other channels of that tensor. Only keeping
those layers in float restores accuracy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.export import ConvertSettings, convert_bytes
from pipeline.tflite_info import inspect_tflite
from tests.conftest import run_cli

OUTLIER = 300.0
PLANTED = ("block3_sepconv1", "block5_sepconv2")
EVAL_LIMIT = 100


@pytest.fixture(scope="module")
def sensitive_model(tmp_path_factory, trained_run) -> Path:
    import keras

    folder = tmp_path_factory.mktemp("sensitive")
    model = keras.models.load_model(trained_run.model_path)
    for name in PLANTED:
        layer = model.get_layer(name)
        depthwise, pointwise, *rest = layer.get_weights()
        depthwise[..., 0, :] *= OUTLIER
        pointwise[:, :, 0, :] /= OUTLIER
        layer.set_weights([depthwise, pointwise, *rest])
    model.save(folder / "model.keras")
    shutil.copy2(trained_run.run_dir / "labels.json", folder / "labels.json")
    return folder / "model.keras"


def test_private_quantizer_hook_is_pinned_and_works(trained_run, calibration):
    """Fails on a TensorFlow upgrade that moves or changes the private quantizer entry point."""
    import tensorflow as tf

    from pipeline.float_fallback import SUPPORTED_TF, hooks_supported

    assert tf.__version__.startswith(SUPPORTED_TF), "re-check pipeline/float_fallback.py against this TensorFlow"
    assert hooks_supported() == (True, "ok")
    from pipeline.modelio import load_source

    source = load_source(trained_run.model_path)
    record: dict = {}
    model = convert_bytes(source, ConvertSettings("int8", float_layers=("predictions", "block3_sepconv1")),
                          calibration, calibration_record=record)
    info = inspect_tflite(model)
    assert info.op_histogram.get("FULLY_CONNECTED/float32") == 1
    assert info.op_histogram.get("DEPTHWISE_CONV_2D/float32") == 1  # the separable conv's two ops
    assert record["float_layers"] == ["predictions", "block3_sepconv1"] and len(record["denylisted_nodes"]) == 3
    assert info.inputs[0]["dtype"] == "int8"  # everything else is the stock converter path


def test_unknown_layer_and_unpinned_tensorflow_are_clear_errors(trained_run, calibration, monkeypatch):
    import tensorflow as tf

    from pipeline.errors import ConversionError
    from pipeline.modelio import load_source

    source = load_source(trained_run.model_path)
    with pytest.raises(ConversionError, match="no such layer"):
        convert_bytes(source, ConvertSettings("int8", float_layers=("block99_conv",)), calibration)
    monkeypatch.setattr(tf, "__version__", "2.99.0")
    with pytest.raises(ConversionError, match="pinned to TensorFlow 2.21"):
        convert_bytes(source, ConvertSettings("int8", float_layers=("predictions",)), calibration)


def test_drop_meter_agrees_with_xedge_validate(trained_run, trained_tflite, digits, tmp_path):
    from pipeline.accuracy_budget import DropMeter
    from pipeline.validate import validate

    meter = DropMeter(trained_run.model_path, digits["val"], limit=60)
    measured = meter.measure(Path(trained_tflite["int8"]).read_bytes())
    report = validate(trained_run.model_path, trained_tflite["int8"], digits["val"], tmp_path, limit=60,
                      layer_samples=0).report
    for key in ("top1_drop_pp", "top1_quant", "top1_float", "agreement"):
        assert measured[key] == pytest.approx(report[key], abs=1e-9), key


def test_budget_already_met_needs_no_fallback(trained_run, calibration, digits, tmp_path):
    from pipeline.accuracy_budget import convert_within_budget

    result = convert_within_budget(trained_run.model_path, ConvertSettings("int8"), representative=calibration,
                                   eval_dir=digits["val"], max_drop_pp=2.0, eval_limit=EVAL_LIMIT,
                                   out=tmp_path / "m.tflite", latency=lambda a, b: pytest.fail("no fallback, no bench"))
    manifest = json.loads((tmp_path / "m.manifest.json").read_text())
    record = manifest["float_fallback"]
    assert record["layers"] == [] and manifest["settings"]["float_layers"] == []
    assert len(record["steps"]) == 1 and record["reached"] is True and record["latency"] is None
    assert record["final_top1_drop_pp"] <= 2.0 and record["eval"]["images"] == EVAL_LIMIT
    assert not inspect_tflite((tmp_path / "m.tflite").read_bytes()).heavy_float_ops


def test_cli_reaches_budget_by_keeping_planted_layers_in_float(sensitive_model, digits, tmp_path):
    out = tmp_path / "sens_int8.tflite"
    proc = run_cli("convert", sensitive_model, "--int8", "--calib", digits["samples"], "--calib-size", 64,
                   "--max-drop", 1, "--eval", digits["val"], "--eval-limit", EVAL_LIMIT, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "sens_int8.manifest.json").read_text())
    record = manifest["float_fallback"]
    steps = [s["top1_drop_pp"] for s in record["steps"]]
    assert steps[0] > 10, steps  # the planted outliers really hurt int8
    assert record["reached"] and record["final_top1_drop_pp"] <= 1.0 and steps[-1] <= 1.0
    assert set(record["layers"]) <= set(PLANTED) and record["layers"], record["layers"]
    assert manifest["settings"]["float_layers"] == record["layers"] and manifest["settings"]["allow_float_fallback"]
    left = " ".join(e["output"] for e in manifest["ops"]["left_float"])
    assert all(f"/{layer}_1/" in left for layer in record["layers"])
    assert manifest["optimizations"], "the graph rewrites are applied and checked on the final model"
    assert record["latency"]["all_quantized_p50_ms"] > 0 and record["latency"]["with_fallback_p50_ms"] > 0
    assert "latency cost of the fallback" in proc.stdout and "float layers: " in proc.stdout


def test_cli_unreachable_budget_keeps_best_under_distinct_name(sensitive_model, digits, tmp_path):
    out = tmp_path / "sens_int8.tflite"
    proc = run_cli("convert", sensitive_model, "--int8", "--calib", digits["samples"], "--calib-size", 64,
                   "--max-drop", 0.5, "--eval", digits["val"], "--eval-limit", EVAL_LIMIT, "--max-float-layers", 1,
                   "--out", out)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "budget even with 1 layers in float" in errors[0] and "_over_budget.tflite" in errors[0]
    assert not out.exists()
    best = json.loads((tmp_path / "sens_int8_over_budget.manifest.json").read_text())["float_fallback"]
    assert best["reached"] is False and len(best["layers"]) == 1
    assert best["final_top1_drop_pp"] > 0.5 and best["final_top1_drop_pp"] < best["steps"][0]["top1_drop_pp"]


def test_int16x8_is_the_other_lever(sensitive_model, calibration, digits, tmp_path):
    """16-bit activations absorb the planted outliers that int8 cannot; no layer needs to stay float."""
    from pipeline.accuracy_budget import convert_within_budget
    from pipeline.errors import BudgetNotReached

    result = convert_within_budget(sensitive_model, ConvertSettings("int16x8"), representative=calibration,
                                   eval_dir=digits["val"], max_drop_pp=2.0, eval_limit=EVAL_LIMIT,
                                   out=tmp_path / "m16.tflite")
    assert result.float_layers == [] and result.final["top1_drop_pp"] <= 2.0
    assert inspect_tflite(result.export.model_bytes).inputs[0]["dtype"] == "int16"
    if result.final["top1_drop_pp"] > 0:  # a zero budget then needs a fallback int16x8 cannot have in TF 2.21
        with pytest.raises(BudgetNotReached, match="not available for --int16x8"):
            convert_within_budget(sensitive_model, ConvertSettings("int16x8"), representative=calibration,
                                  eval_dir=digits["val"], max_drop_pp=0.0, eval_limit=EVAL_LIMIT,
                                  out=tmp_path / "m16b.tflite")
    assert np.isfinite(result.final["kl_mean"])

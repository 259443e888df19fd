"""Quantization-aware training: a tiny Xception fine-tunes one epoch and converts to full int8 without --calib."""

from __future__ import annotations

import json
import os

import numpy as np

from tests.conftest import TINY, invoke_cli, run_cli


def test_translation_to_tf_keras_is_exact():
    """The tf_keras twin (separable convs split) computes what the Keras 3 model computes."""
    from pipeline.model.xception import build_xception
    from pipeline.model.model_tfkeras import translate

    model = build_xception(**TINY)
    twin = translate(model)
    assert "block2_sepconv1_depthwise" in [layer.name for layer in twin.layers]
    assert not any(type(layer).__name__ == "SeparableConv2D" for layer in twin.layers)
    x = np.random.default_rng(1).uniform(-1, 1, (3, 71, 71, 3)).astype("float32")
    np.testing.assert_allclose(twin(x).numpy(), np.asarray(model(x)), rtol=1e-5, atol=1e-6)


def test_qat_one_epoch_then_convert_to_full_int8_without_calibration(tmp_path, trained_run, digits):
    proc = run_cli("xedge", "qat", trained_run.model_path, "--data", digits["samples"], "--val", digits["val"],
                   "--out", "runs/qat", "--epochs", "1", "--batch-size", "16", cwd=tmp_path, check=True)
    assert "validation accuracy" in proc.stdout
    run = tmp_path / "runs/qat"
    assert json.loads((run / "labels.json").read_text()) == {"classes": [str(d) for d in range(10)]}
    m = json.loads((run / "manifest.json").read_text())
    assert m["kind"] == "qat-run" and len(m["history"]) == 1 and m["source"]["sha256"]
    assert m["history"][0]["val_accuracy"] > 0.3  # far above chance after QAT on a briefly trained model
    assert os.readlink(tmp_path / "runs/latest") == "qat"

    from pipeline.conversion.export import is_qat_model
    from pipeline.model.modelio import load_source

    source = load_source(run / "model.h5")  # under tfmot's quantize_scope
    assert source.kind == "tf_keras" and is_qat_model(source) and source.classes == 10
    assert "TF_USE_LEGACY_KERAS" not in os.environ  # tfmot's import must not switch later processes' Keras

    # the QAT run in a real process (tfmot's import must stay out of this one); its conversion and refusal are
    # checked in-process (CliRunner), on the model this process has just loaded itself
    conv = invoke_cli("convert", "--int8", "--json", cwd=tmp_path)  # runs/latest/model.h5, no --calib
    assert conv.returncode == 0, conv.stderr
    summary = json.loads(conv.stdout.strip().splitlines()[-1])
    assert summary["float_ops"] == 0 and summary["calibration_samples"] == 0
    manifest = json.loads((run / "model_int8.manifest.json").read_text())
    assert manifest["settings"]["qat_source"] is True
    heavy = {k: v for k, v in _ops_by_type(run / "model_int8.tflite").items()
             if k[0] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")}
    assert heavy and all(dtype == "int8" for (_, dtype) in heavy), heavy
    assert manifest["io"]["inputs"][0]["dtype"] == "int8"
    # its FakeQuant ranges were learned on [-1, 1]: it keeps that input, says why, and refuses pixels clearly
    assert manifest["input_convention"]["name"] == "signed_unit"
    assert "quantization-aware" in manifest["input_convention"]["why"]
    refused = invoke_cli("convert", "--int8", "--input-convention", "pixels", "--out", "p.tflite", cwd=tmp_path)
    assert refused.returncode == 2 and "quantization-aware" in refused.stderr and "signed-unit" in refused.stderr
    assert not (tmp_path / "p.tflite").exists()


def _ops_by_type(path):
    """(op, dtype) -> count, from the shared inspector's ``OP/dtype`` histogram."""
    from pipeline.tflite.contents import inspect_tflite

    return {tuple(key.split("/", 1)): n for key, n in inspect_tflite(path.read_bytes()).op_histogram.items()}

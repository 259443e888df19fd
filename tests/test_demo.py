"""`xedge demo`: the whole pipeline on the embedded digits, as a user runs it."""

import json

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("xedge", "demo", "--out", out, "--epochs", "2", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "oneDNN" not in proc.stderr
    for name in ("model_float.tflite", "model_int8.tflite", "model_int8.manifest.json", "run/model.keras",
                 "run/labels.json"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "model_int8.manifest.json").read_text())
    assert manifest["calibration"]["count"] == 100
    assert manifest["ops"]["left_float"] == []
    assert len(list((out / "data" / "train").iterdir())) == 10
    assert "validation accuracy of the float model" in proc.stdout
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["samples"] > 300 and report["top1_drop_pp"] <= 5.0
    assert (out / "report" / "report.html").stat().st_size > 10_000
    assert "int8 drift" in proc.stdout and "model_int8 / model_float" in proc.stdout
    assert "XNNPACK partitions │ 1" in proc.stdout

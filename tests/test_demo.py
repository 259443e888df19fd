"""`xedge demo`: the whole pipeline on the embedded digits, as a user runs it."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import invoke_cli, run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo-out"  # the name docs/converting.md's MediaPipe snippet uses
    proc = run_cli("xedge", "demo", "--out", out, "--epochs", "2", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "oneDNN" not in proc.stderr
    for name in ("model_float.tflite", "model_int8.tflite", "model_int8.manifest.json", "run/model.keras",
                 "run/labels.json"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "model_int8.manifest.json").read_text())
    assert manifest["calibration"]["count"] == 100
    assert manifest["ops"]["left_float"] == []
    assert manifest["input_convention"]["name"] == "pixels" and manifest["io"]["inputs"][0]["dtype"] == "uint8"
    assert len(list((out / "data" / "train").iterdir())) == 10
    assert "validation accuracy of the float model" in proc.stdout
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["samples"] > 300 and report["top1_drop_pp"] <= 5.0
    assert (out / "report" / "report.html").stat().st_size > 10_000
    assert "int8 drift" in proc.stdout and "model_int8 / model_float" in proc.stdout
    assert "XNNPACK partitions │ 1" in proc.stdout
    _docs_mediapipe_snippet_names_validates_top1(tmp_path, out)


def _docs_mediapipe_snippet_names_validates_top1(cwd: Path, out: Path) -> None:
    """docs/converting.md's five-line MediaPipe snippet, run as written beside the demo's output, prints the
    class name of the top-1 that ``xedge validate``'s own runner computes for the same image."""
    from pipeline.core.data import Item
    from pipeline.core.preprocessing import PreprocessSpec
    from pipeline.validation.predict import TfliteRunner
    from pipeline.validation.validate import load_item

    text = (ROOT / "docs" / "converting.md").read_text()
    command = next(block for block in re.findall(r"```sh\n(.*?)```", text, re.S) if "demo-out/data/samples" in block)
    words = shlex.split(command)
    assert words[:3] == ["xedge", "convert", "demo-out/run/model.keras"] and "--int8" in words
    # the docs' convert --int8 --calib, as written, over the demo's model; in-process (CliRunner): the demo above
    # already ran the real process
    converted = invoke_cli(*words, cwd=cwd)
    assert converted.returncode == 0, converted.stderr[-2000:]
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "ImageClassifier" in block)
    assert len(snippet.strip().splitlines()) == 5
    printed = subprocess.run([sys.executable, "-c", snippet], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr[-2000:]
    image = sorted((out / "data" / "val_rgb").glob("*/*.png"))[0]
    pixels, _ = load_item(Item(image, None), PreprocessSpec(size=71))
    runner = TfliteRunner(out / "model_int8.tflite", workers=1)
    try:
        top1 = int(runner.predict_pixels(pixels[None]).argmax())
    finally:
        runner.close()
    labels = json.loads((out / "model_int8.manifest.json").read_text())["labels"]
    assert printed.stdout.strip().splitlines()[-1] == labels[top1]

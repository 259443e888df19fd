"""`xedge parity`: the same model-size pixels through this machine's LiteRT and real targets, image by image.

Targets are real: tflite-runtime 2.14 through a local-transport device profile
(the venv `make tflite-runtime` makes), and MediaPipe's ImageClassifier. The
assertions are what the maths gives for any trained model: a top-1 can change
only where this machine's top-1 margin is at most twice the output
difference (a near tie); a float output differs by float rounding only; the
exit code agrees with the report's own count. A runtime version may differ by
a few quanta and even flip a tie, so nothing asserts 0 where the maths does not.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.data import write_model_size_rgb
from pipeline.core.preprocessing import PreprocessSpec, pixels_for, preprocess_file, quantize
from pipeline.validation.parity_images import ModelIO, TensorSpec, runner_inputs
from tests.conftest import ROOT, missing, run_cli

TFLITE_RUNTIME_VENV = ROOT / ".cache" / "tflite-runtime-2.14"
FLOAT_BOUND = 1e-4  # float32 softmax outputs in [0, 1]: rounding differences of two kernel versions stay far below


@pytest.fixture(scope="module")
def tflite_runtime_profile(tmp_path_factory) -> Path:
    """A local-transport device profile whose python is the tflite-runtime 2.14 venv: that runtime as a target."""
    python = TFLITE_RUNTIME_VENV / "bin" / "python"
    check = [str(python), "-c", "import tflite_runtime, numpy; assert numpy.__version__ < '2'"]
    if not python.exists() or subprocess.run(check, capture_output=True).returncode != 0:
        missing(f"needs the tflite-runtime 2.14 venv {TFLITE_RUNTIME_VENV.relative_to(ROOT)} (make tflite-runtime "
                "makes it)")
    path = tmp_path_factory.mktemp("profiles") / "tflite-runtime-214.toml"
    path.write_text(f'transport = "local"\npython = "{python}"\ndescription = "tflite-runtime 2.14 here"\n')
    return path


@pytest.fixture(scope="module")
def mediapipe_installed() -> None:
    if importlib.util.find_spec("mediapipe") is None:
        missing("needs mediapipe (the dev extra installs it)")


def _invoke(*args):
    """In-process, through the same click command as the console script."""
    from click.testing import CliRunner

    from convert import cli

    return CliRunner().invoke(cli, ["parity", *map(str, args)])


def _parity(model, digits, tmp_path, *targets, extra=()):
    report = tmp_path / "parity.json"
    result = _invoke(model, "--eval", digits["val"], *targets, "--report", report, *extra)
    assert result.exit_code in (0, 3), result.output + result.stderr
    return result, json.loads(report.read_text())


def _check_consistent(result, report: dict) -> None:
    """The exit code, the verdicts and the named images agree with the report's own rows."""
    for target in report["targets"]:
        rows = target["rows"]
        assert target["images"] == len(rows) == report["inputs"]["used"] > 0
        mismatched = [r["path"] for r in rows if not r["top1_match"]]
        assert target["mismatched"] == mismatched and target["top1_mismatches"] == len(mismatched)
        assert target["max_diff"] == max(r["max_diff"] for r in rows)
        assert target["identical_outputs"] == sum(r["max_diff"] == 0 for r in rows)
        # each output moves by at most the difference, so a changed top-1 needs a margin of at most twice it
        assert all(r["reference_margin"] <= 2 * r["max_diff"] for r in rows if not r["top1_match"])
        for path in mismatched[:10]:
            assert Path(path).name in result.stderr  # a mismatch names the images
    failed = any(t["top1_mismatches"] or t["over_tolerance"] for t in report["targets"])
    assert result.exit_code == (3 if failed else 0) and report["passed"] is not failed


def test_float_model_matches_tflite_runtime_214(trained_tflite, digits, tflite_runtime_profile, tmp_path):
    result, report = _parity(trained_tflite["float"], digits, tmp_path, "--device", tflite_runtime_profile)
    _check_consistent(result, report)
    target = report["targets"][0]
    assert target["runtime"].startswith("tflite_runtime 2.14") and "over local" in target["where"]
    assert report["inputs"]["convention"] == "pixels as they are (float32; the model's [-1, 1] scaling is folded in)"
    assert "model's input size (71x71 px)" in report["inputs"]["what"] and "71x71" in result.output
    assert report["unit"] == "absolute units (float32 output)"
    assert target["max_diff"] < FLOAT_BOUND


def test_int8_model_against_tflite_runtime_214_reports_quanta_per_image(trained_tflite, digits,
                                                                        tflite_runtime_profile, tmp_path):
    result, report = _parity(trained_tflite["int8"], digits, tmp_path, "--device", tflite_runtime_profile)
    _check_consistent(result, report)
    out = report["model"]["output"]
    assert report["unit"] == f"quanta (output scale {out['scale']:.6g}, {out['dtype']})"
    rows = report["targets"][0]["rows"]
    # differences come from the integers the runtimes gave: whole quanta, at most the output's range
    assert all(float(r["max_diff"]).is_integer() and 0 <= r["max_diff"] <= 255 for r in rows)
    assert all(float(r["reference_margin"]).is_integer() for r in rows)


def test_a_tolerance_in_quanta_fails_exactly_the_images_over_it(trained_tflite, digits, tflite_runtime_profile,
                                                                tmp_path):
    result, report = _parity(trained_tflite["int8"], digits, tmp_path, "--device", tflite_runtime_profile,
                             extra=("--max-quanta", 0, "--limit", 40))
    _check_consistent(result, report)
    target = report["targets"][0]
    assert target["tolerance"] == 0
    assert target["over_tolerance"] == [r["path"] for r in target["rows"] if r["max_diff"] > 0]


def test_the_reference_sees_what_validate_feeds(trained_tflite, digits):
    """Parity's LiteRT input is bit for bit what `xedge validate` feeds each model, from the same pixels."""
    from pipeline.core.preprocessing import model_input
    from pipeline.tflite.input_convention import file_convention
    from pipeline.validation.parity import LitertReference
    from pipeline.validation.predict import TfliteRunner

    images = sorted(Path(digits["val"]).glob("*/*.png"))[:12]
    spec = PreprocessSpec(size=71)
    pixels = np.stack([pixels_for(p, spec) for p in images])
    for kind in ("float", "int8"):
        io = LitertReference(trained_tflite[kind]).io
        runner = TfliteRunner(trained_tflite[kind], workers=1)
        runner.close()
        assert runner.convention == "pixels"
        expected = quantize(model_input(pixels, runner.convention), io.input.dtype, io.input.scale,
                            io.input.zero_point)
        feed = runner_inputs(io, pixels, file_convention(trained_tflite[kind])[0])
        assert feed.tensor.dtype == expected.dtype and np.array_equal(feed.tensor, expected)
        assert np.array_equal(feed.pixels, pixels)


def test_a_pixel_input_takes_each_of_the_256_values_as_its_own_level():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    for dtype, zero in (("uint8", 0), ("int8", -128)):
        io = ModelIO(TensorSpec(dtype, (1, 16, 16, 3), 1.0, zero), TensorSpec("float32", (1, 10), 0.0, 0))
        feed = runner_inputs(io, pixels)
        assert np.array_equal(feed.tensor.astype(np.int64), pixels.astype(np.int64) + zero)
        assert len(np.unique(feed.tensor)) == 256


def test_mediapipe_agrees_on_top1_with_the_float_model(trained_tflite, digits, mediapipe_installed, tmp_path):
    result, report = _parity(trained_tflite["float"], digits, tmp_path, "--mediapipe")
    _check_consistent(result, report)
    target = report["targets"][0]
    assert target["runtime"].startswith("mediapipe ") and "ImageClassifier" in target["runtime"]
    assert "mp.Image SRGB" in target["fed"]
    # MediaPipe normalizes (p - 127.5) / 127.5 from the metadata where xedge computes p / 127.5 - 1: one float32
    # ulp apart on some pixel values, so the outputs differ by rounding only
    assert target["max_diff"] < FLOAT_BOUND


def test_mediapipe_on_the_int8_model(trained_tflite, digits, mediapipe_installed, tmp_path):
    """MediaPipe takes uint8 or float32 image inputs: an int8 input is refused in one line, exit 2."""
    from pipeline.tflite.runtime import open_interpreter

    model = trained_tflite["int8"]
    input_dtype = open_interpreter(model.read_bytes()).get_input_details()[0]["dtype"]
    # a real process: one line on the terminal means no native log of MediaPipe's or TensorFlow's either
    result = run_cli("xedge", "parity", model, "--eval", digits["val"], "--mediapipe", "--limit", 20)
    if np.dtype(input_dtype) != np.int8:  # a pixel-input (uint8) model: MediaPipe takes it
        assert result.returncode in (0, 3), result.stdout + result.stderr
        return
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MediaPipe's ImageClassifier refuses"), result.stderr
    assert "got INT8" in lines[0] and "--float-io" in lines[0]


class _ShiftedOutputs:
    """A broken runtime: this machine's interpreter, but its output columns are off by one class."""

    name = "shifted"

    def __init__(self, model, io):
        from pipeline.validation.parity import LitertReference

        self.inner = LitertReference(model)

    def run(self, feed, step=None):
        out = self.inner.run(feed, step)
        out.scores, out.raw = np.roll(out.scores, 1, axis=1), np.roll(out.raw, 1, axis=1)
        out.runtime, out.where = "shifted " + out.runtime, "a test"
        return out


def test_a_different_target_fails_parity_with_exit_3_and_names_the_images(trained_tflite, digits, tmp_path,
                                                                          monkeypatch):
    import convert

    monkeypatch.setattr(convert, "_parity_targets", lambda devices, mediapipe: [_ShiftedOutputs])
    result, report = _parity(trained_tflite["float"], digits, tmp_path, "--mediapipe", extra=("--limit", 30))
    _check_consistent(result, report)
    assert result.exit_code == 3 and "parity failed: shifted: top-1 differs on" in result.stderr
    rows = report["targets"][0]["rows"]
    # a unique top-1 moves to the next class: every image with a non-zero margin must be named
    assert {r["path"] for r in rows if r["reference_margin"] > 0} <= set(report["targets"][0]["mismatched"])
    assert report["targets"][0]["top1_mismatches"] > 0


def test_help_is_instant_and_lists_the_targets():

    start = time.perf_counter()
    proc = run_cli("xedge", "parity", "--help", check=True)
    assert time.perf_counter() - start < 5  # no TensorFlow, LiteRT or MediaPipe import for --help
    for flag in ("--eval", "--device", "--mediapipe", "--labels", "--limit", "--max-quanta", "--max-abs", "--report"):
        assert flag in proc.stdout
    assert "xedge parity model_float.tflite --eval ./val" in proc.stdout
    assert "parity" in run_cli("xedge", "--help", check=True).stdout


def test_usage_needs_a_target(trained_tflite, digits):
    result = _invoke(trained_tflite["float"], "--eval", digits["val"])
    assert result.exit_code == 2 and "choose at least one target" in result.output + result.stderr


def test_mediapipe_decoding_is_reported_apart_from_the_runtime(trained_tflite, digits, mediapipe_installed,
                                                               tmp_path):
    """Files already RGB at the model's size are also decoded by MediaPipe itself; a lossless PNG decodes to the
    same pixels in any decoder, so its outputs are identical. Other files are counted as not compared."""
    rgb = write_model_size_rgb(digits["val"], tmp_path / "rgb", size=71)
    result = _invoke(trained_tflite["float"], "--eval", rgb, "--mediapipe", "--report", tmp_path / "rgb.json")
    decoding = json.loads((tmp_path / "rgb.json").read_text())["targets"][0]["decoding"]
    n = len(list(Path(digits["val"]).rglob("*.png")))
    assert decoding["compared"] == n and decoding["not_compared"] == 0
    assert decoding["identical_outputs"] == n and decoding["top1_changed"] == [] and decoding["max_diff"] == 0
    assert "decoding (reported, not gated)" in result.output
    _, report = _parity(trained_tflite["float"], digits, tmp_path, "--mediapipe", extra=("--limit", "20"))
    decoding = report["targets"][0]["decoding"]  # the digits are 32x32 one-channel PNGs: MediaPipe would resize
    assert decoding["compared"] == 0 and decoding["not_compared"] == 20

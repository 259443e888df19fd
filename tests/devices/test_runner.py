"""devices/runner.py as a real subprocess, under every interpreter it supports.

The tflite-runtime 2.14 case runs in its own virtual environment holding only
numpy<2 and tflite-runtime, made by `make tflite-runtime` under .cache/: that
is the proof that the runner needs nothing else from this project or its venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import missing

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "devices" / "runner.py"
TFLITE_RUNTIME_VENV = ROOT / ".cache" / "tflite-runtime-2.14"


def run_runner(python, *args, timeout=300, env=None):
    base = {"PATH": os.environ.get("PATH", os.defpath), "HOME": os.environ.get("HOME", "/tmp"),
            "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([str(python), "-I", str(RUNNER), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**base, **(env or {})})
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def digit_inputs(tmp_path_factory, calibration) -> Path:
    """Real decoded digits (uint8 pixels, through the one preprocessing definition) as the runner's .npy batch:
    what ``xedge bench --inputs`` sends; the runner feeds each model its own convention."""
    path = tmp_path_factory.mktemp("inputs") / "inputs.npy"
    np.save(path, np.stack(calibration.samples[:12]).astype(np.uint8))
    return path


def _validate_outputs(model, pixels) -> np.ndarray:
    """The outputs ``xedge validate`` computes for these pixels (its runner, the model's own convention)."""
    from pipeline.validation.predict import TfliteRunner

    runner = TfliteRunner(model, workers=1)
    try:
        return runner.predict_pixels(pixels)
    finally:
        runner.close()


@pytest.fixture(scope="session")
def tflite_runtime_python() -> Path:
    """Python of the venv `make tflite-runtime` makes (`make test` depends on it): numpy<2 and tflite-runtime 2.14."""
    python = TFLITE_RUNTIME_VENV / "bin" / "python"
    check = [str(python), "-c", "import tflite_runtime, numpy; assert numpy.__version__ < '2'"]
    if not python.exists() or subprocess.run(check, capture_output=True).returncode != 0:
        missing(f"needs the tflite-runtime 2.14 venv {TFLITE_RUNTIME_VENV.relative_to(ROOT)} (make tflite-runtime "
                "makes it)")
    return python


def test_litert_result_has_every_field(trained_tflite):
    proc, out = run_runner(sys.executable, trained_tflite["int8"], "--runs", 10, "--warmup", 2, "--threads", 2)
    assert proc.returncode == 0, proc.stderr
    assert set(out["latency_ms"]) == {"min", "p50", "p90", "p99", "mean", "max", "std"}
    lat = out["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert out["runs"] == 10 and out["warmup"] == 2 and out["threads"] == 2
    assert out["runtime"]["name"] == "ai_edge_litert" and out["runtime"]["version"].startswith("2.")
    # The runner's own peak, not this (TensorFlow-sized) parent's: ru_maxrss would survive the exec.
    assert out["init_ms"] > 0 and 10 < out["peak_rss_mb"] < 400
    assert out["machine"]["cpu"] and out["machine"]["cpu_count"] >= 1
    from pipeline.core.artifacts import sha256_file

    assert out["model"]["sha256"] == sha256_file(trained_tflite["int8"])
    assert out["model"]["precision"] == "int8" and out["model"]["input_dtype"] == "uint8"
    assert (out["model"]["input_convention"], out["model"]["input_convention_from"]) == ("pixels", "input tensor")
    assert out["inputs"] == {"source": "random", "count": 8, "range": "pixels 0..255"}


def test_random_inputs_are_never_zeros(trained_tflite):
    """The random feeds span the pixel range; zeros would run faster than real data."""
    from devices import runner

    model = runner.Model(str(trained_tflite["int8"]), runner.load_runtime("ai_edge_litert"), 1, True)
    model.prepare_inputs(None, seed=0)
    x = np.stack([f[0] for f in model.feeds])
    assert x.dtype == np.uint8 and x.min() < 5 and x.max() > 250 and (x == 0).mean() < 0.05
    assert len({f[0].tobytes() for f in model.feeds}) == len(model.feeds)


def test_quantization_matches_the_pipeline(trained_tflite, digit_inputs):
    """The runner's copy of quantize() gives bit for bit what pipeline.core.preprocessing.quantize gives."""
    from devices.runner import quantize as runner_quantize
    from pipeline.core.preprocessing import quantize

    x = np.load(digit_inputs)
    assert np.array_equal(runner_quantize(x, np.int8, 2 / 255, -1), quantize(x, np.int8, 2 / 255, -1))


@pytest.mark.parametrize("kind", ["int8", "float"])
def test_outputs_for_real_inputs_match_validate(kind, trained_tflite, digit_inputs, tmp_path):
    """Fed decoded pixels, the runner computes exactly what ``xedge validate`` computes for the same model."""
    proc, out = run_runner(sys.executable, trained_tflite[kind], "--inputs", digit_inputs, "--outputs",
                           tmp_path, "--runs", 3, "--warmup", 0)
    assert proc.returncode == 0, proc.stderr
    assert out["inputs"]["source"] == "file" and out["inputs"]["count"] == 12
    # the float model's input states nothing: the manifest beside it says pixels
    assert out["results" if "results" in out else "model"]["input_convention"] == "pixels"
    got = np.load(tmp_path / out["outputs"]["files"][0]["float"])
    assert got.shape == (12, 10)
    np.testing.assert_array_equal(got, _validate_outputs(trained_tflite[kind], np.load(digit_inputs)))


def test_float_samples_are_the_models_own_inputs_and_the_convention_can_be_given(trained_tflite, digit_inputs,
                                                                                    tmp_path):
    """A float .npy holds the model's own input values (what ``xedge parity`` sends): float32 pixels for the
    folded float model give validate's outputs; --input-convention overrides what the runner reads."""
    from pipeline.core.preprocessing import model_input

    floats = tmp_path / "floats.npy"
    np.save(floats, model_input(np.load(digit_inputs), "pixels"))
    proc, out = run_runner(sys.executable, trained_tflite["float"], "--inputs", floats, "--outputs",
                           tmp_path / "a", "--runs", 1, "--warmup", 0)
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "a" / out["outputs"]["files"][0]["float"])
    np.testing.assert_array_equal(got, _validate_outputs(trained_tflite["float"], np.load(digit_inputs)))
    proc, out = run_runner(sys.executable, trained_tflite["float"], "--input-convention", "signed_unit",
                           "--runs", 1, "--warmup", 0)
    assert proc.returncode == 0 and out["model"]["input_convention_from"] == "asked for"
    proc, out = run_runner(sys.executable, trained_tflite["float"], trained_tflite["int8"], "--input-convention",
                           "pixels", "--input-convention", "pixels", "--input-convention", "pixels")
    assert proc.returncode == 2 and "once for every model" in out["error"]


def test_tensorflow_lite_runtime(trained_tflite):
    proc, out = run_runner(sys.executable, trained_tflite["float"], "--runtime", "tensorflow", "--runs", 3,
                           "--warmup", 1, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert out["runtime"]["name"] == "tensorflow" and out["latency_ms"]["p50"] > 0


def test_xnnpack_off_runs_builtin_kernels(trained_tflite):
    _, on = run_runner(sys.executable, trained_tflite["float"], "--runs", 3)
    _, off = run_runner(sys.executable, trained_tflite["float"], "--runs", 3, "--no-xnnpack")
    assert on["xnnpack"] and on["ops"]["delegate_partitions"] >= 1
    assert not off["xnnpack"] and off["ops"]["delegate_partitions"] == 0


def test_two_models_alternate_and_give_pair_ratios(trained_tflite):
    proc, out = run_runner(sys.executable, trained_tflite["float"], trained_tflite["int8"], "--runs", 8,
                           "--keep-times")
    assert proc.returncode == 0, proc.stderr
    a, b = out["results"]
    assert out["compare"]["a"] == "float" and out["compare"]["b"] == "int8" and out["compare"]["pairs"] == 8
    ratios = sorted(tb / ta for ta, tb in zip(a["times_ms"], b["times_ms"]))
    assert out["compare"]["ratio_b_over_a"]["min"] == pytest.approx(ratios[0], rel=1e-3)
    assert out["compare"]["ratio_b_over_a"]["p50"] == pytest.approx(np.median(ratios), rel=1e-3)


def test_refuses_a_file_that_is_not_tflite(tmp_path):
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"PK\x03\x04 a zip, not a flatbuffer")
    proc, out = run_runner(sys.executable, bad)
    assert proc.returncode == 2 and "not a TFLite model" in out["error"]


def test_bad_inputs_shape_is_an_error(trained_tflite, tmp_path):
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 32, 32, 3), np.float32))
    proc, out = run_runner(sys.executable, trained_tflite["float"], "--inputs", wrong)
    assert proc.returncode == 2 and "shape (32, 32, 3)" in out["error"]


@pytest.mark.slow
def test_tflite_runtime_214_with_numpy_1_only(tflite_runtime_python, trained_tflite, digit_inputs, tmp_path):
    """Same outputs as LiteRT on real inputs; and int8 is not delegated to XNNPACK there (the known slowdown)."""
    listing = subprocess.run([str(tflite_runtime_python), "-m", "pip", "list", "--format=freeze"],
                             capture_output=True, text=True).stdout
    installed = {line.split("==")[0].lower() for line in listing.split()}
    assert installed <= {"numpy", "tflite-runtime", "pip", "setuptools", "wheel"}
    proc, out = run_runner(tflite_runtime_python, trained_tflite["int8"], "--inputs", digit_inputs, "--outputs",
                           tmp_path / "old", "--runs", 3, "--warmup", 1)
    assert proc.returncode == 0, proc.stderr
    assert out["runtime"] == {"name": "tflite_runtime", "version": "2.14.0"}
    assert out["numpy"].startswith("1.")
    assert out["ops"]["delegate_partitions"] == 0
    _, new = run_runner(sys.executable, trained_tflite["int8"], "--inputs", digit_inputs, "--outputs",
                        tmp_path / "new", "--runs", 3, "--warmup", 1)
    name = out["outputs"]["files"][0]["raw"]
    old_out, new_out = np.load(tmp_path / "old" / name), np.load(tmp_path / "new" / name)
    # Reference kernels (2.14) and XNNPACK (LiteRT) round int8 intermediates differently: same top-1,
    # logits within a few quantization steps (5 of 256 seen on the tiny digits model).
    assert (old_out.argmax(1) == new_out.argmax(1)).all()
    # and the top-1 is the one ``xedge validate`` computes for the same pixels
    assert (old_out.argmax(1) == _validate_outputs(trained_tflite["int8"], np.load(digit_inputs)).argmax(1)).all()
    # A rounding difference early on is requantized through every later layer, more where bias correction put
    # the biases on the other side of a rounding boundary (15 steps seen): bounded loosely, on average small.
    diff = np.abs(old_out.astype(int) - new_out.astype(int))
    assert diff.max() <= 32 and diff.mean() < 1


def test_missing_runtime_is_named(trained_tflite):
    proc, out = run_runner(sys.executable, trained_tflite["float"], "--runtime", "tflite_runtime")
    assert proc.returncode == 2
    assert out["error"].startswith("no TFLite interpreter could be imported (tflite_runtime: No module named")

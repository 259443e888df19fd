"""devices/runner.py as a real subprocess, under every interpreter it supports.

The tflite-runtime 2.14 case runs in its own virtual environment holding only
numpy<2 and tflite-runtime, created once under .cache/ and reused: that is the
proof that the runner needs nothing else from this project or its venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
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
    """Real decoded digits (uint8 pixels, what `xedge bench --inputs` sends) as the runner's .npy batch."""
    path = tmp_path_factory.mktemp("inputs") / "inputs.npy"
    np.save(path, np.stack(calibration.samples[:12]))
    return path


@pytest.fixture(scope="session")
def tflite_runtime_python() -> Path:
    """Python of a venv with only numpy<2 and tflite-runtime 2.14 (from the local mirror), made once."""
    python = TFLITE_RUNTIME_VENV / "bin" / "python"
    check = [str(python), "-c", "import tflite_runtime, numpy; assert numpy.__version__ < '2'"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    base = Path("/usr/bin/python3.11") if Path("/usr/bin/python3.11").exists() else Path(sys.executable)
    made = subprocess.run([str(base), "-m", "venv", "--clear", str(TFLITE_RUNTIME_VENV)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a venv for tflite-runtime: {made.stderr.strip()[-200:]}")
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "tflite-runtime==2.14.0", "numpy<2"],
                         capture_output=True, text=True, timeout=600)
    if pip.returncode != 0:
        pytest.skip(f"tflite-runtime 2.14 is not installable here: {pip.stderr.strip()[-300:]}")
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
    from pipeline.artifacts import sha256_file

    assert out["model"]["sha256"] == sha256_file(trained_tflite["int8"])
    assert out["model"]["precision"] == "int8" and out["model"]["input_dtype"] == "uint8"
    assert out["model"]["input_convention"] == "pixels" and out["model"]["input_convention_from"] == "input tensor"
    assert out["inputs"] == {"source": "random", "count": 8, "range": "pixels 0..255"}


def test_random_inputs_are_never_zeros(trained_tflite, tmp_path):
    """Random pixels, fed as each model's convention says; zeros would run faster than real data."""
    import shutil

    from devices import runner

    model = runner.Model(str(trained_tflite["int8"]), runner.load_runtime("ai_edge_litert"), 1, True)
    model.prepare_inputs(None, seed=0)
    x = np.stack([f[0] for f in model.feeds])
    assert x.dtype == np.uint8 and x.min() < 5 and x.max() > 250 and (x == 0).mean() < 0.05
    assert len({f[0].tobytes() for f in model.feeds}) == len(model.feeds)
    # a float model with pixel input says so only in its manifest: read beside it, else assumed [-1, 1]
    bare = tmp_path / "bare.tflite"
    shutil.copy(trained_tflite["float"], bare)
    for path, expected in ((trained_tflite["float"], ("pixels", "manifest")),
                           (bare, ("signed_unit", "assumed (no manifest; pass --input-convention)"))):
        model = runner.Model(str(path), runner.load_runtime("ai_edge_litert"), 1, True)
        assert (model.convention, model.convention_from) == expected
        model.prepare_inputs(None, seed=0)
        x = np.stack([f[0] for f in model.feeds])
        assert x.dtype == np.float32 and (x.max() > 250 if expected[0] == "pixels" else x.max() <= 1.0)


def test_quantization_matches_the_pipeline(trained_tflite, digit_inputs):
    """The runner's copies of model_input(), unscale() and quantize() give bit for bit what
    pipeline.preprocessing gives."""
    from devices import runner
    from pipeline import preprocessing

    p = np.load(digit_inputs)
    for convention in ("signed_unit", "pixels", "pixels_int8"):
        assert np.array_equal(runner.model_input(p, convention), preprocessing.model_input(p, convention))
    x = preprocessing.scale(p)
    assert np.array_equal(runner.quantize(x, np.int8, 2 / 255, -1), preprocessing.quantize(x, np.int8, 2 / 255, -1))
    assert np.array_equal(runner.unscale(x), preprocessing.unscale(x))
    assert np.array_equal(np.rint(runner.unscale(x)), p)  # [-1, 1] inputs map back to their pixels


@pytest.mark.parametrize("model", ["int8", "float"])
def test_outputs_for_real_inputs_match_the_build_machine(trained_tflite, digit_inputs, tmp_path, model):
    """Decoded pixels in: the runner feeds each model exactly what `xedge validate`'s runner feeds it."""
    from pipeline.predict import TfliteRunner

    proc, out = run_runner(sys.executable, trained_tflite[model], "--inputs", digit_inputs, "--outputs",
                           tmp_path, "--runs", 3, "--warmup", 0)
    assert proc.returncode == 0, proc.stderr
    assert out["inputs"]["source"] == "file" and out["inputs"]["count"] == 12
    assert out["model"]["input_convention"] == "pixels"
    files = out["outputs"]["files"][0]
    got = np.load(tmp_path / files["float"])
    assert got.shape == (12, 10)
    runner = TfliteRunner(trained_tflite[model], workers=1)
    try:
        assert np.array_equal(got, runner.predict_pixels(np.load(digit_inputs)))
    finally:
        runner.close()


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
    diff = np.abs(old_out.astype(int) - new_out.astype(int))
    assert diff.max() <= 12 and diff.mean() < 1


def test_missing_runtime_is_named(trained_tflite):
    proc, out = run_runner(sys.executable, trained_tflite["float"], "--runtime", "tflite_runtime")
    assert proc.returncode == 2
    assert out["error"].startswith("no TFLite interpreter could be imported (tflite_runtime: No module named")

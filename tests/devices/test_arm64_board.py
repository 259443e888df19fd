"""The device runner and parity on an aarch64 board: the one `make arm64-board` emulates (`make test` builds it).

The runner runs unchanged under qemu-user on Debian's arm64 Python, in each
runtime's venv; the emulated core is a Raspberry Pi 4's Cortex-A72. What is
asserted is what the maths gives on any trained model: LiteRT's reference
kernels (portable integer C++) give this machine's integers exactly; the
optimized int8 kernels (XNNPACK's under ai-edge-litert, the builtin ones
under tflite-runtime 2.14, which gives XNNPACK no int8 op) requantize in
their own way per ISA, so a top-1 may change only where this machine's top-1
margin is at most twice the measured output difference (a near tie); a float
output differs by float rounding only. Each board run is a few seconds: tiny
models, a few dozen held-out digits.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, missing, run_cli

BOARD = ROOT / ".cache" / "arm64-board"
LAUNCHER = ROOT / "devices" / "arm64" / "board"
RUNNER = ROOT / "devices" / "runner.py"
LITERT, TFLITE_RUNTIME = "ai-edge-litert-2.3", "tflite-runtime-2.14"
IMAGES = 36  # held-out digits per parity run
FLOAT_BOUND = 1e-4  # float32 softmax outputs in [0, 1]: two ISAs' rounding differences stay far below


def board_profile(folder: Path, runtime: str, core: str = "cortex-a72") -> Path:
    """The shipped arm64-emulated profile with another runtime's venv (and core), as a user would copy it."""
    path = folder / f"arm64-{runtime}-{core}.toml"
    shipped = (ROOT / "devices" / "profiles" / "arm64-emulated.toml").read_text()
    path.write_text(shipped.replace("cortex-a72", core).replace(f"{LITERT}/bin", f"{runtime}/bin"))
    return path


@pytest.fixture(scope="session")
def board(tmp_path_factory) -> dict[str, Path]:
    """The board's profiles per runtime; the board must be built and have passed its self-check (session-scoped,
    so a missing board is reported before the models are trained)."""
    check = BOARD / "check.json"
    if not (BOARD / ".installed").is_file() or not json.loads(check.read_text())["passed"]:
        missing(f"needs the emulated arm64 board {BOARD.relative_to(ROOT)} (make arm64-board builds it, as root)")
    folder = tmp_path_factory.mktemp("arm64-profiles")
    return {rt: board_profile(folder, rt) for rt in (LITERT, TFLITE_RUNTIME)}


@pytest.fixture(scope="module")
def held_out(digits) -> np.ndarray:
    """A few dozen held-out digits at the tiny models' input size, as uint8 pixels (what `xedge bench` sends)."""
    from pipeline.core.preprocessing import PreprocessSpec, pixels_for

    files = sorted(Path(digits["val"]).rglob("*.png"))[:IMAGES]
    pixels = np.stack([pixels_for(f, PreprocessSpec(size=71)) for f in files])
    assert pixels.dtype == np.uint8
    return pixels


def _bench(model, profile, inputs, outputs):
    from devices.bench import bench
    from devices.profile import load_profile

    return bench([model], load_profile(str(profile)), runs=1, warmup=0, inputs=inputs, outputs=outputs)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", [LITERT, TFLITE_RUNTIME])
def test_the_runner_runs_on_aarch64_under_each_runtime(runtime, board, trained_tflite, held_out, tmp_path):
    """Both models on the board; tflite-runtime 2.14's XNNPACK takes no int8 op, and the runner says so."""
    for kind in ("int8", "float"):
        result = _bench(trained_tflite[kind], board[runtime], held_out[:12], tmp_path / kind)
        assert result["machine"]["machine"] == "aarch64" and "cortex-a72 emulated" in result["machine"]["cpu"]
        assert result["device"]["emulated"] is True
        assert result["runtime"]["name"] == runtime.rsplit("-", 1)[0].replace("-", "_")
        assert result["runtime"]["version"].startswith(runtime.rsplit("-", 1)[1])
        no_partition = runtime == TFLITE_RUNTIME and kind == "int8"
        assert (result["ops"]["delegate_partitions"] == 0) is no_partition
        assert bool(result["warnings"]) is no_partition
        if no_partition:
            assert "ai-edge-litert" in result["warnings"][0]
        outputs = np.load(tmp_path / kind / result["outputs"]["files"][0]["float"])
        assert outputs.shape == (12, 10) and np.isfinite(outputs).all()


def _parity(model, digits, profile, tmp_path):
    report = tmp_path / "parity.json"
    proc = run_cli("xedge", "parity", model, "--eval", digits["val"], "--device", profile, "--limit", IMAGES,
                   "--report", report)
    assert proc.returncode in (0, 3), proc.stderr
    target = json.loads(report.read_text())["targets"][0]
    assert "(aarch64, emulated" in target["where"] and target["images"] == IMAGES
    return proc, target


def _agrees_but_for_near_ties(proc, target) -> None:
    """Every output moves by at most max_diff, so a changed top-1 needs a margin of at most twice that."""
    assert all(r["top1_match"] or r["reference_margin"] <= 2 * r["max_diff"] for r in target["rows"])
    assert proc.returncode == (3 if target["top1_mismatches"] else 0)


@pytest.mark.slow
@pytest.mark.parametrize("venv, runtime", [(LITERT, "ai_edge_litert 2.3.0"),
                                           (TFLITE_RUNTIME, "tflite_runtime 2.14.0")])
def test_each_aarch64_runtime_changes_top1_only_on_near_ties(board, trained_tflite, digits, tmp_path, venv, runtime):
    """On the emulated Pi 4, ai-edge-litert 2.3's XNNPACK int8 kernels (one quantum apart on a rare output) and
    tflite-runtime 2.14's builtin ones (a few quanta) requantize in their own way: a top-1 may change only on a
    near tie; the float model stays within float rounding."""
    proc, target = _parity(trained_tflite["int8"], digits, board[venv], tmp_path / "int8")
    assert target["runtime"] == runtime
    _agrees_but_for_near_ties(proc, target)
    print(f"{runtime} on aarch64, int8: up to {target['max_diff']} quanta, "
          f"{target['identical_outputs']} of {IMAGES} identical, {target['top1_mismatches']} top-1 changed")
    proc, target = _parity(trained_tflite["float"], digits, board[venv], tmp_path / "float")
    assert target["max_diff"] < FLOAT_BOUND
    _agrees_but_for_near_ties(proc, target)


@pytest.mark.slow
def test_litert_reference_kernels_are_bit_identical_on_aarch64(board, trained_tflite, held_out, tmp_path):
    """LiteRT's reference kernels are portable integer C++: the board computes this machine's integers exactly."""
    np.save(tmp_path / "inputs.npy", held_out[:8])
    outputs = {}
    for where, prefix in (("here", [sys.executable]),
                          ("board", [str(LAUNCHER), "--cpu", "cortex-a72", f"{LITERT}/bin/python"])):
        proc = subprocess.run([*prefix, "-I", str(RUNNER), trained_tflite["int8"], "--reference-kernels", "--runs",
                               "1", "--warmup", "0", "--inputs", tmp_path / "inputs.npy", "--outputs",
                               tmp_path / where], capture_output=True, text=True, timeout=600)
        result = json.loads(proc.stdout.splitlines()[-1])
        assert proc.returncode == 0 and result["kernels"] == "reference" and not result["xnnpack"], proc.stderr
        assert result["machine"]["machine"] == ("aarch64" if where == "board" else platform.machine())
        outputs[where] = np.load(tmp_path / where / result["outputs"]["files"][0]["raw"])
    assert outputs["here"].dtype.kind in "iu" and np.array_equal(outputs["board"], outputs["here"])


@pytest.mark.slow
def test_emulated_times_are_never_called_latencies(board, trained_tflite, tmp_path):
    """The bench table and line say EMULATED; a budget against the profile is marked in every output."""
    proc = run_cli("xedge", "bench", trained_tflite["int8"], "--device", board[LITERT], "--runs", 1)
    assert proc.returncode == 0, proc.stderr
    assert "EMULATED" in proc.stdout and "latency on" not in proc.stdout
    profile = tmp_path / "budgeted.toml"
    profile.write_text(board[LITERT].read_text() + '[budgets.int8]\np50_ms = 1e6\n')
    proc = run_cli("xedge", "latency-test", "--device", profile, trained_tflite["int8"], "--out", tmp_path / "out",
                   "--runs", 1)
    assert proc.returncode == 0, proc.stderr
    assert "EMULATED" in proc.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["emulated"] is True and "emulated times" in summary["cases"][0]["message"]
    junit = (tmp_path / "out" / "junit.xml").read_text()
    assert 'name="emulated[budgeted]"' in junit and '<property name="emulated" value="true"' in junit


def _launch(*args, board_dir):
    return subprocess.run([str(LAUNCHER), "--board", str(board_dir), *args], capture_output=True, text=True,
                          timeout=60)


def test_the_launcher_serves_only_a_checked_board_on_a_named_core(tmp_path):
    """No stamp (the self-check did not pass), no core or qemu's `max`: one line, exit 2, nothing run."""
    (tmp_path / "cpuinfo").mkdir()
    (tmp_path / "cpuinfo" / "cortex-a72").write_text("processor\t: 0\n")
    proc = _launch("--cpu", "cortex-a72", "python", board_dir=tmp_path)
    assert proc.returncode == 2 and "has not passed its self-check" in proc.stderr
    (tmp_path / ".installed").write_text("")
    for cpu in ("max", ""):
        proc = _launch("--cpu", cpu, "python", board_dir=tmp_path)
        assert proc.returncode == 2 and "--cpu must name an emulated core: cortex-a72" in proc.stderr
    proc = _launch("--cpu", "cortex-a72", "python", board_dir=tmp_path / "none")
    assert proc.returncode == 2 and "not built" in proc.stderr and "make arm64-board" in proc.stderr


def test_the_shipped_profile_finds_its_launcher_and_a_prefix_needs_python(tmp_path):
    """A relative exec prefix names a launcher in the devices package; exec_prefix belongs to a local profile."""
    from devices.profile import load_profile, parse_profile
    from pipeline.core.errors import DeviceError

    profile = load_profile("arm64-emulated")
    assert profile.emulated and profile.exec_prefix[0] == str(LAUNCHER)
    assert profile.exec_prefix[1:] == ("--cpu", "cortex-a72") and profile.python == f"{LITERT}/bin/python"
    with pytest.raises(DeviceError, match="exec_prefix is for the local transport"):
        parse_profile({"transport": "ssh", "host": "pi", "python": "python3", "exec_prefix": ["x"]}, "p")
    with pytest.raises(DeviceError, match="with python"):
        parse_profile({"exec_prefix": ["x"]}, "p")

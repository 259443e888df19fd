"""Interrupts and half-written outputs: every signal ends in the old outputs or the new ones, and the right exit code.

Each signal is sent at a fault point (``pipeline.core.faults``): the process
stops there, writes its pid to a marker file, and the test signals it while
it waits, so the signal lands at that point every time. Each case is a row
of docs/bad-input.md ("Interrupts and half-written outputs").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core import artifacts
from pipeline.core.errors import ArtifactError, DeviceError
from pipeline.core.faults import PAUSE_ENV
from pipeline.tflite.input_convention import manifest_beside
from pipeline.tflite.sandboxed_load import check_manifest
from tests.conftest import VENV_BIN, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _paused(args: list[str], point: str, marker: Path, *, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.Popen:
    """Start ``args`` with the fault point ``point`` armed; return once the process waits there."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {}), PAUSE_ENV: f"{point}:{marker}"})
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        proc.kill()
        raise AssertionError(f"never reached {point}: {proc.communicate(timeout=60)}")
    assert int(marker.read_text()) == proc.pid
    return proc


def _finish(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


# ---------------------------------------------------------------- the model/manifest pair

# Writes a new pair over OUT from the files NEW and NEW.json, with the CLI's signal handling and exit codes.
_WRITER = """
import json, sys
from pathlib import Path
from pipeline.core import artifacts, interrupts
out, new = Path(sys.argv[1]), Path(sys.argv[2])
try:
    with interrupts.terminate_as_interrupt():
        artifacts.atomic_write_pair(out, new.read_bytes(), artifacts.manifest_path_for(out),
                                    json.loads(Path(sys.argv[3]).read_text()))
except KeyboardInterrupt as exc:
    sys.exit(interrupts.exit_code(exc))
"""


# A distinct, valid convention per pair, so a reader that mixed two records would be caught.
CONVENTION = {"old": "signed_unit", "new": "pixels"}


def _manifest(mode: str, data: bytes) -> dict:
    manifest = artifacts.base_manifest("tflite")
    manifest.update({"settings": {"mode": mode}, "preprocessing": {"input_convention": CONVENTION[mode]},
                     "output": {"bytes": len(data)}})
    return manifest


def _old_pair(folder: Path, *, with_manifest: bool = True) -> tuple[Path, bytes, bytes | None]:
    out = folder / "m.tflite"
    old = b"old model bytes"
    out.write_bytes(old)
    if not with_manifest:
        return out, old, None
    manifest = _manifest("old", old)
    manifest["output"]["sha256"] = artifacts.sha256_bytes(old)
    artifacts.manifest_path_for(out).write_bytes(artifacts.to_json(manifest))
    return out, old, artifacts.manifest_path_for(out).read_bytes()


def _seen(out: Path) -> tuple[str | None, str]:
    """What every reader of the pair sees: the mode of the record describing the model's bytes, and its state."""
    if not out.exists():
        return None, "absent"
    data = out.read_bytes()
    check_manifest(out, data)  # what bench, validate and convert run first: refuses a mismatch or a torn pair
    found = artifacts.integrity(out, data)
    record = manifest_beside(out, data)
    assert (record is None) == (found.record is None) and (record or {}) == (found.record or {})
    assert record is None or record["preprocessing"]["input_convention"] == CONVENTION[record["settings"]["mode"]]
    return (record or {}).get("settings", {}).get("mode"), found.state


POINTS = ("pair-staged", "pair-between", "pair-after")
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("point", POINTS)
def test_a_signal_anywhere_in_a_pair_write_leaves_the_old_pair_or_the_new_one(tmp_path, point, sig):
    out, old, old_manifest = _old_pair(tmp_path)
    new = tmp_path / "new.bin"
    new.write_bytes(b"new model bytes, longer")
    (tmp_path / "new.json").write_text(json.dumps(_manifest("new", new.read_bytes())))
    before = {p.name for p in tmp_path.iterdir()}
    proc = _paused([sys.executable, "-c", _WRITER, str(out), str(new), str(tmp_path / "new.json")], point,
                   tmp_path / "paused")
    code, err = _finish(proc, sig)

    mode, state = _seen(out)
    assert state == "ok"
    left = {p.name for p in tmp_path.iterdir()} - before - {"paused"}
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        assert mode == ("new" if point == "pair-after" else "old")  # the bridge manifest serves both
        assert {n for n in left if not n.endswith(".tmp")} == set()  # staged files may stay, hidden
    else:
        assert code == 128 + sig, err
        assert left == set(), left
        if point == "pair-after":  # the model had moved: the final manifest lands, then the interrupt
            assert mode == "new" and out.read_bytes() == new.read_bytes()
            assert "previous" not in json.loads(artifacts.manifest_path_for(out).read_text())
        else:  # before the model moved: the old pair, byte for byte
            assert out.read_bytes() == old and artifacts.manifest_path_for(out).read_bytes() == old_manifest


@pytest.mark.parametrize("point", ("pair-between", "pair-after"))
def test_a_kill_mid_write_over_a_model_without_manifest_or_over_nothing(tmp_path, point):
    """A model without a manifest of ours stays unchecked until the new pair is in; no model stays no model."""
    for with_old in (True, False):
        folder = tmp_path / f"old-{with_old}"
        folder.mkdir()
        out, _, _ = _old_pair(folder, with_manifest=False)
        if not with_old:
            out.unlink()
        new = folder / "new.bin"
        new.write_bytes(b"new model bytes, longer")
        (folder / "new.json").write_text(json.dumps(_manifest("new", new.read_bytes())))
        proc = _paused([sys.executable, "-c", _WRITER, str(out), str(new), str(folder / "new.json")], point,
                       folder / "paused")
        assert _finish(proc, signal.SIGKILL)[0] == -signal.SIGKILL
        if point == "pair-after":
            assert _seen(out) == ("new", "ok")
        else:
            assert _seen(out) == ((None, "unchecked") if with_old else (None, "absent"))


def test_the_final_manifest_has_no_bridge_and_a_rewrite_keeps_one_level(tmp_path):
    out, _, _ = _old_pair(tmp_path)
    for i in range(3):
        data = f"model {i}".encode()
        artifacts.atomic_write_pair(out, data, artifacts.manifest_path_for(out), _manifest("new", data))
        written = json.loads(artifacts.manifest_path_for(out).read_text())
        assert "previous" not in written and written["output"]["sha256"] == artifacts.sha256_bytes(data)
        assert _seen(out) == ("new", "ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.manifest.json", "m.tflite"]


def _convert_args(source: Path, samples: Path, out: Path) -> list[str]:
    return [str(VENV_BIN / "convert"), str(source), "--int8", "--calib", str(samples), "--calib-size", "20",
            "--out", str(out), "--force"]


@pytest.mark.slow
def test_convert_killed_or_interrupted_between_the_renames(trained_tflite, digits, tmp_path):
    """The real CLI over a real pair: killed between the renames, bench runs the old model (no "unfinished
    write"); interrupted there, it exits 130 and the old pair is byte for byte what it was."""
    out = tmp_path / "m.tflite"
    old_model = Path(trained_tflite["float"]).read_bytes()
    old_manifest = artifacts.manifest_path_for(trained_tflite["float"]).read_bytes()
    args = _convert_args(trained_tflite["float"], digits["samples"], out)
    for sig in (signal.SIGKILL, signal.SIGINT):
        out.write_bytes(old_model)
        artifacts.manifest_path_for(out).write_bytes(old_manifest)
        marker = tmp_path / f"paused-{sig}"
        hidden = {p.name for p in tmp_path.iterdir() if p.name.startswith(".")}  # a kill leaves its staged files
        code, err = _finish(_paused(args, "pair-between", marker), sig)
        assert out.read_bytes() == old_model
        bench = run_cli("xedge", "bench", out, "--runs", "2")
        assert bench.returncode == 0, bench.stderr
        if sig == signal.SIGINT:
            assert (code, err) == (130, "interrupted; no partial output was left behind\n")
            assert artifacts.manifest_path_for(out).read_bytes() == old_manifest
            assert {p.name for p in tmp_path.iterdir() if p.name.startswith(".")} == hidden
        else:
            assert json.loads(artifacts.manifest_path_for(out).read_text())["previous"]["settings"]["mode"] == "float"
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert artifacts.integrity(out, out.read_bytes()).record["settings"]["mode"] == "int8"


# ---------------------------------------------------------------- an output path that is a folder


def test_an_output_path_that_is_a_folder_is_refused_before_anything_is_written(trained_tflite, digits, tmp_path):
    folder = tmp_path / "d"
    (folder / "m.tflite").mkdir(parents=True)
    for force in (True, False):
        with pytest.raises(ArtifactError, match="it is a folder"):
            artifacts.check_writable(folder / "m.tflite", force=force)
    args = _convert_args(trained_tflite["float"], digits["samples"], folder / "m.tflite")
    for extra in ([], ["--force"]):
        proc = subprocess.run([*[a for a in args if a != "--force"], *extra], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2
        assert proc.stderr == f"error: cannot write {folder / 'm.tflite'}: it is a folder; nothing was changed\n"
        assert [p.name for p in folder.iterdir()] == ["m.tflite"] and not any((folder / "m.tflite").iterdir())
    (folder / "m.tflite").rmdir()
    (folder / "m.manifest.json").mkdir()  # the manifest's path: the pair could not be written either
    with pytest.raises(ArtifactError, match=r"m\.manifest\.json: it is a folder"):
        artifacts.check_writable(folder / "m.tflite", force=True)


# ---------------------------------------------------------------- interrupts inside the converter

# The converter's extension module, loaded the way pybind11 loads one: an exception raised while it
# initializes (here Ctrl-C, delivered at the fault point) comes out as ImportError("initialization failed").
_CONVERT_INTERRUPTED_IN_EXTENSION = """
import sys
from pathlib import Path
from pipeline.conversion import converter_hooks
from pipeline.core import faults

landed, argv = Path(sys.argv[1]), sys.argv[2:]
load = converter_hooks._converter_api

def initialize():
    try:
        faults.pause("extension-init")
    except KeyboardInterrupt as exc:
        landed.write_text("KeyboardInterrupt inside the extension's initialization")
        raise ImportError("initialization failed") from exc
    return load()

converter_hooks._converter_api = initialize
sys.argv = ["convert", *argv]
import convert
convert.main()
"""


def test_ctrl_c_inside_the_converter_exits_130(trained_tflite, digits, tmp_path):
    out = tmp_path / "q.tflite"
    landed = tmp_path / "landed"
    args = _convert_args(trained_tflite["float"], digits["samples"], out)[1:]
    proc = _paused([sys.executable, "-c", _CONVERT_INTERRUPTED_IN_EXTENSION, str(landed), *args], "extension-init",
                   tmp_path / "paused")
    code, err = _finish(proc, signal.SIGINT)
    assert landed.exists()  # the interrupt reached the converter as an ImportError
    assert (code, err) == (130, "interrupted; no partial output was left behind\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["landed", "paused"]


# ---------------------------------------------------------------- SIGTERM and child processes


def test_sigterm_during_convert_of_a_tflite_removes_the_probe(trained_tflite, digits, tmp_path):
    """The sandboxed probe of a .tflite source is running when SIGTERM lands: it is ended and its files go."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "q.tflite"
    proc = _paused(_convert_args(trained_tflite["float"], digits["samples"], out), "source-loaded",
                   tmp_path / "paused", env={"TMPDIR": str(tmp)})
    assert [p.name.startswith("xedge-probe-") for p in tmp.iterdir()] == [True]  # the probe is pending
    code, err = _finish(proc, signal.SIGTERM)
    assert (code, err) == (143, "terminated (SIGTERM); no partial output was left behind\n")
    assert list(tmp.iterdir()) == [] and not out.exists()


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_a_hanging_target_is_ended_with_its_children(trained_tflite, tmp_path):
    from devices.local import LocalTransport
    from devices.profile import DeviceProfile
    from devices.transport_base import BenchRequest

    pid_file = tmp_path / "grandchild"
    target = tmp_path / "python"  # the profile's "python": a target that starts a child, then hangs
    target.write_text(f"#!/bin/sh\nsleep 1000 &\necho $! > {pid_file}\nwait\n")
    target.chmod(0o755)
    profile = DeviceProfile(name="hangs", python=str(target), command_timeout_s=5)
    try:
        with pytest.raises(DeviceError, match="took longer than 5 s"):
            LocalTransport(profile).bench(BenchRequest(models=(Path(trained_tflite["float"]),), runs=1, warmup=0))
        grandchild = int(pid_file.read_text())
        deadline = time.monotonic() + 30
        while not _gone(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(grandchild), f"the target's child {grandchild} outlived the timeout"
    finally:
        if pid_file.exists() and not _gone(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)

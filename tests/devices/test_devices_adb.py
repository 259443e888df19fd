"""The adb transport against a stand-in ``adb`` first on PATH that runs commands on this machine.

The stand-in logs each command line (so the tests check the exact adb
commands), keeps "device" files in a local folder used as the profile's
workdir, and runs ``adb shell`` strings with ``sh -c`` as adbd would. The
``benchmark_model`` samples in tests/data are in the format of TFLite's
benchmark_model (benchmark_model.cc: Stat lines and "Inference timings in us").
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import sys
from pathlib import Path

import pytest

from devices.bench import bench
from devices.benchmark_model import parse_benchmark_model
from devices.profile import DeviceProfile
from pipeline.core.errors import DeviceError

DATA = Path(__file__).resolve().parents[1] / "data"

FAKE_ADB = """#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_ADB_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[:1] == ["-s"]:
    serial, args = args[1], args[2:]
if args == ["devices"]:
    print("List of devices attached")
    print(os.environ.get("FAKE_ADB_DEVICES", "").replace(";", "\\n"))
    print()
elif args[0] == "push":
    os.makedirs(os.path.dirname(args[2]), exist_ok=True)
    shutil.copy(args[1], args[2])
    print(args[1] + ": 1 file pushed, 0 skipped.")
elif args[0] == "pull":
    shutil.copytree(args[1], os.path.join(args[2], os.path.basename(args[1])))
    print(args[1] + "/: 2 files pulled, 0 skipped.")
elif args[0] == "shell":
    sys.exit(subprocess.run(["sh", "-c", " ".join(args[1:])]).returncode)
else:
    sys.exit("fake adb: unsupported " + " ".join(args))
"""


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    adb = bindir / "adb"
    adb.write_text(FAKE_ADB.format(python=sys.executable))
    adb.chmod(adb.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "adb.log"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ADB_LOG", str(log))
    monkeypatch.setenv("FAKE_ADB_DEVICES", "R58M123ABC\tdevice")
    device = tmp_path / "device tmp"
    device.mkdir()

    def commands():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return {"device": device, "commands": commands, "tmp": tmp_path}


def _profile(fake_adb, **kw) -> DeviceProfile:
    base = dict(name="phone", transport="adb", workdir=str(fake_adb["device"]), runs=4, warmup=1, threads=2)
    return DeviceProfile(**{**base, **kw})


def test_python_on_device_exact_commands(fake_adb, trained_tflite, calibration, tmp_path):
    import numpy as np

    inputs = np.stack(calibration.samples[:3])  # decoded pixels, as `xedge bench --inputs` sends
    result = bench([trained_tflite["int8"]], _profile(fake_adb, python=sys.executable), inputs=inputs,
                   outputs=tmp_path / "out")
    assert result["runtime"]["name"] == "ai_edge_litert" and result["device"]["transport"] == "adb"
    assert np.load(tmp_path / "out" / "int8_output0.npy").shape == (3, 10)
    cmds = fake_adb["commands"]()
    assert cmds[0] == ["devices"]
    assert all(c[:2] == ["-s", "R58M123ABC"] for c in cmds[1:])
    folder = shlex.split(cmds[1][3])[-1]
    assert re.fullmatch(re.escape(str(fake_adb["device"])) + r"/xedge-[0-9a-f]{8}", folder)
    q = shlex.quote
    assert cmds[1] == ["-s", "R58M123ABC", "shell", f"mkdir -p {q(folder)}"]
    assert cmds[2][2:] == ["push", str(Path(__file__).resolve().parents[2] / "devices" / "runner.py"),
                           f"{folder}/runner.py"]
    assert cmds[3][2:] == ["push", str(trained_tflite["int8"]), f"{folder}/model0.tflite"]
    assert cmds[4][2] == "push" and cmds[4][4] == f"{folder}/inputs.npy"
    assert cmds[5][2:] == ["shell", " ".join(q(w) for w in [
        sys.executable, f"{folder}/runner.py", f"{folder}/model0.tflite", "--runs", "4", "--warmup", "1",
        "--threads", "2", "--runtime", "auto", "--seed", "0", "--name", "int8", "--input-convention", "pixels",
        "--inputs", f"{folder}/inputs.npy", "--outputs", f"{folder}/outputs"])]
    assert cmds[6][2] == "pull" and cmds[6][3] == f"{folder}/outputs"
    assert cmds[7][2:] == ["shell", f"rm -rf {q(folder)}"]
    assert list(fake_adb["device"].iterdir()) == []


def test_benchmark_model_binary_exact_commands_and_parsing(fake_adb, trained_tflite):
    tool = fake_adb["tmp"] / "android_aarch64_benchmark_model"
    args_log = fake_adb["tmp"] / "tool_args"
    sample = DATA / "benchmark_model_android.txt"
    tool.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {shlex.quote(str(args_log))}\n"
                    f"cat {shlex.quote(str(sample))}\n")
    tool.chmod(0o755)
    result = bench([trained_tflite["int8"]], _profile(fake_adb, benchmark_model=str(tool)))
    cmds = fake_adb["commands"]()
    folder = shlex.split(cmds[1][3])[-1]
    assert cmds[2][2:] == ["push", str(tool), f"{folder}/benchmark_model"]
    assert cmds[3][2:] == ["push", str(trained_tflite["int8"]), f"{folder}/model0.tflite"]
    tool_args = [f"--graph={folder}/model0.tflite", "--num_threads=2", "--warmup_runs=1", "--num_runs=4",
                 "--warmup_min_secs=0", "--min_secs=0", "--use_xnnpack=true"]
    remote_tool = shlex.quote(folder + "/benchmark_model")
    assert cmds[4][2:] == ["shell", f"chmod 755 {remote_tool} && {remote_tool} "
                           + " ".join(shlex.quote(a) for a in tool_args)]
    assert args_log.read_text().splitlines() == tool_args
    assert result["latency_ms"] == {"min": 46.21, "p50": 47.019, "p90": 49.875, "p99": None, "mean": 47.3886,
                                    "max": 53.977, "std": 1.204}
    assert result["init_ms"] == 212.84 and result["runs"] == 50 and result["warmup"] == 5
    assert result["peak_rss_mb"] == 64.1133 and result["threads"] == 2
    assert result["ops"] == {"nodes": 134, "delegated_nodes": 134, "delegate_partitions": 1}
    assert result["latency_source"]["p90"].startswith("p95")
    assert result["model"]["name"] == "int8" and result["device"]["name"] == "phone"
    assert list(fake_adb["device"].iterdir()) == []


def test_parse_older_benchmark_model_without_percentiles():
    result = parse_benchmark_model((DATA / "benchmark_model_old.txt").read_text())
    assert result["latency_ms"]["mean"] == 305.871 and result["latency_ms"]["p50"] is None
    assert result["latency_ms"]["min"] == 303.902 and result["runs"] == 50 and result["threads"] == 2
    assert result["peak_rss_mb"] == 47.8594 and result["init_ms"] == 301.113


def test_failed_benchmark_model_names_the_reason():
    with pytest.raises(DeviceError, match="Didn't find op for builtin opcode 'CONV_2D'"):
        parse_benchmark_model((DATA / "benchmark_model_failed.txt").read_text())


@pytest.mark.parametrize("devices, serial, message", [
    ("", None, "no device attached"),
    ("R58M123ABC\tdevice;emulator-5554\tdevice", None, "2 devices attached .*set serial"),
    ("R58M123ABC\tunauthorized", None, "unauthorized: unlock it and accept"),
    ("R58M123ABC\toffline", None, "is offline"),
    ("R58M123ABC\tdevice", "OTHER", "device OTHER is not attached"),
])
def test_device_selection_errors(fake_adb, monkeypatch, trained_tflite, devices, serial, message):
    monkeypatch.setenv("FAKE_ADB_DEVICES", devices)
    with pytest.raises(DeviceError, match=message):
        bench([trained_tflite["float"]], _profile(fake_adb, python=sys.executable, serial=serial))
    assert fake_adb["commands"]() == [["devices"]]


def test_serial_chooses_among_several(fake_adb, monkeypatch, trained_tflite):
    monkeypatch.setenv("FAKE_ADB_DEVICES", "R58M123ABC\tdevice;emulator-5554\tdevice")
    bench([trained_tflite["float"]], _profile(fake_adb, python=sys.executable, serial="emulator-5554", runs=1))
    assert all(c[:2] == ["-s", "emulator-5554"] for c in fake_adb["commands"]()[1:])


def test_no_adb_on_path(trained_tflite, tmp_path):
    profile = DeviceProfile(name="p", transport="adb", python="python3", adb=str(tmp_path / "missing-adb"))
    with pytest.raises(DeviceError, match="not found"):
        bench([trained_tflite["float"]], profile)


def test_compare_needs_python_on_the_device(fake_adb, trained_tflite):
    profile = _profile(fake_adb, benchmark_model="/bin/true")
    with pytest.raises(DeviceError, match="needs Python on the device"):
        bench([trained_tflite["float"], trained_tflite["int8"]], profile)

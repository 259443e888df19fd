"""An Android device over adb: the runner where the device has Python, else ``benchmark_model``.

Most phones have no Python; TFLite's native ``benchmark_model`` binary (for
the device's ABI, supplied by the user) is then pushed and its log parsed into
the runner's JSON. ``adb shell`` joins its arguments with spaces and hands
them to the device's shell, so every remote command is built as one string of
``shlex.quote``d words. The device is always addressed with ``-s SERIAL``,
chosen once from ``adb devices``, so a second device plugged in mid-run
cannot receive half a bench.
"""

from __future__ import annotations

import secrets
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from devices.benchmark_model import parse_benchmark_model
from devices.transport_base import RUNNER, BenchRequest, parse_runner_output, run_in_group
from pipeline.core.artifacts import sha256_file
from pipeline.core.errors import DeviceError

DEFAULT_WORKDIR = "/data/local/tmp"


def _quote(args) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def parse_devices(text: str) -> dict[str, str]:
    """``adb devices`` output -> {serial: state} (device, unauthorized, offline, ...)."""
    found = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*", "adb server")):
            continue
        parts = line.split()
        if len(parts) >= 2:
            found[parts[0]] = parts[1]
    return found


class AdbTransport:
    def __init__(self, profile):
        self.profile = profile
        self.serial: str | None = None

    def _adb(self, *args, timeout: float, what: str) -> subprocess.CompletedProcess:
        cmd = [self.profile.adb, *(["-s", self.serial] if self.serial else []), *map(str, args)]
        try:
            proc = run_in_group(cmd, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise DeviceError(f"adb: {self.profile.adb!r} not found; install Android platform-tools or set adb "
                              "in the profile") from None
        except subprocess.TimeoutExpired:
            raise DeviceError(f"adb {self.serial or ''}: {what} took longer than {timeout:g} s "
                              "(command_timeout_s in the profile)") from None
        return proc

    def _check(self, proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()
            raise DeviceError(f"adb {self.serial}: {what} failed (exit {proc.returncode})"
                              + (f": {tail[-1]}" if tail else ""))
        return proc

    def select_device(self) -> str:
        proc = self._adb("devices", timeout=self.profile.connect_timeout_s + 20, what="listing devices")
        self._check(proc, "adb devices")
        devices = parse_devices(proc.stdout)
        wanted = self.profile.serial
        if wanted:
            state = devices.get(wanted)
            if state is None:
                raise DeviceError(f"adb: device {wanted} is not attached (attached: "
                                  f"{', '.join(devices) or 'none'})")
        else:
            if not devices:
                raise DeviceError("adb: no device attached; connect one with USB debugging enabled "
                                  "(adb devices lists none)")
            if len(devices) > 1:
                raise DeviceError(f"adb: {len(devices)} devices attached ({', '.join(sorted(devices))}); "
                                  "set serial in the device profile to choose one")
            wanted, state = next(iter(devices.items()))
        if state == "unauthorized":
            raise DeviceError(f"adb: device {wanted} is unauthorized: unlock it and accept the "
                              "'Allow USB debugging' prompt, then retry")
        if state != "device":
            raise DeviceError(f"adb: device {wanted} is {state}; reconnect it (adb reconnect)")
        self.serial = wanted
        return wanted

    def _shell(self, words, *, timeout: float, what: str) -> subprocess.CompletedProcess:
        return self._adb("shell", words if isinstance(words, str) else _quote(words), timeout=timeout, what=what)

    def bench(self, request: BenchRequest) -> dict:
        p = self.profile
        if p.benchmark_model and not p.python:
            if len(request.models) > 1:
                raise DeviceError("adb: comparing two models needs Python on the device (runs alternate in one "
                                  "process); benchmark_model runs one model at a time", setting="compare")
            if request.outputs:
                raise DeviceError("adb: saving outputs needs Python on the device (python in the profile)")
        self.select_device()
        folder = f"{(p.workdir or DEFAULT_WORKDIR).rstrip('/')}/xedge-{secrets.token_hex(4)}"
        self._check(self._shell(["mkdir", "-p", folder], timeout=p.connect_timeout_s + 20, what="mkdir"), "mkdir")
        try:
            if p.python:
                return self._bench_python(folder, request)
            return self._bench_native(folder, request)
        finally:
            try:
                self._shell(["rm", "-rf", folder], timeout=p.connect_timeout_s + 20, what="cleanup")
            except DeviceError:
                pass  # the bench's own error matters more than a stale folder in /data/local/tmp

    def _push(self, local: Path, remote: str) -> None:
        self._check(self._adb("push", str(local), remote, timeout=self.profile.command_timeout_s,
                              what=f"pushing {Path(local).name}"), f"push {Path(local).name}")

    def _bench_python(self, folder: str, request: BenchRequest) -> dict:
        p = self.profile
        names = [f"{folder}/model{i}.tflite" for i in range(len(request.models))]
        self._push(RUNNER, f"{folder}/runner.py")
        for local, remote in zip(request.models, names):
            self._push(local, remote)
        inputs = f"{folder}/inputs.npy" if request.inputs is not None else None
        if request.inputs is not None and inputs is not None:
            self._push(request.inputs, inputs)
        outputs = f"{folder}/outputs" if request.outputs is not None else None
        command = _quote([p.python, f"{folder}/runner.py", *request.runner_args(names, inputs, outputs)])
        proc = self._shell(command, timeout=p.command_timeout_s, what="the bench")
        result = parse_runner_output(proc, f"adb {self.serial}")
        if request.outputs is not None and outputs is not None:
            with tempfile.TemporaryDirectory() as tmp:
                self._check(self._adb("pull", outputs, tmp, timeout=p.command_timeout_s, what="pulling outputs"),
                            "pull outputs")
                target = Path(request.outputs)
                target.mkdir(parents=True, exist_ok=True)
                for path in Path(tmp).rglob("*.npy"):
                    shutil.move(str(path), target / path.name)
        return result

    def _bench_native(self, folder: str, request: BenchRequest) -> dict:
        p = self.profile
        binary = Path(p.benchmark_model).expanduser()
        if not binary.is_file():
            raise DeviceError(f"adb: benchmark_model binary {binary} not found (benchmark_model in the profile)")
        tool, model = f"{folder}/benchmark_model", f"{folder}/model0.tflite"
        self._push(binary, tool)
        self._push(request.models[0], model)
        command = (_quote(["chmod", "755", tool]) + " && " + _quote([
            tool, f"--graph={model}", f"--num_threads={request.threads}", f"--warmup_runs={request.warmup}",
            f"--num_runs={request.runs}", "--warmup_min_secs=0", "--min_secs=0",
            f"--use_xnnpack={'true' if request.xnnpack else 'false'}"]))
        proc = self._shell(command, timeout=p.command_timeout_s, what="benchmark_model")
        result = parse_benchmark_model(proc.stdout + "\n" + proc.stderr)
        if proc.returncode != 0:
            raise DeviceError(f"adb {self.serial}: benchmark_model exited {proc.returncode}")
        model_path = request.models[0]

        result.update({"threads": request.threads, "xnnpack": request.xnnpack,
                       "inputs": {"source": "random (benchmark_model)"},
                       "model": {"name": model_path.stem, "sha256": sha256_file(model_path),
                                 "bytes": model_path.stat().st_size}})
        result["machine"] = self._machine()
        return result

    def _machine(self) -> dict:
        proc = self._shell("getprop ro.product.model; getprop ro.product.cpu.abi; getprop ro.soc.model",
                           timeout=self.profile.connect_timeout_s + 20, what="getprop")
        model, abi, soc = ([*proc.stdout.splitlines(), "", "", ""])[:3] if proc.returncode == 0 else ("", "", "")
        return {"machine": abi.strip() or None, "system": "Android", "cpu": soc.strip() or None,
                "device": model.strip() or None, "serial": self.serial}

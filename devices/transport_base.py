"""What every transport does: run the runner (or a native tool) on a device, return its JSON.

A transport gets a ``BenchRequest`` (host paths) and returns the runner's
result dict. ``local``, ``ssh`` and ``adb`` implement it; ``devices.transports``
maps a profile's ``transport`` name to one of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import DeviceError

RUNNER = Path(__file__).resolve().parent / "runner.py"


@dataclass(frozen=True)
class BenchRequest:
    models: tuple[Path, ...]          # one, or two to compare (alternating A/B runs)
    runs: int = 50
    warmup: int = 5
    threads: int = 1
    xnnpack: bool = True
    runtime: str = "auto"
    inputs: Path | None = None        # a .npy batch: uint8 decoded pixels, or float32 [-1, 1] inputs
    outputs: Path | None = None       # a local folder that receives the device's outputs
    keep_times: bool = False
    seed: int = 0
    conventions: tuple[str, ...] = ()  # each model's input convention, as the host read it (runner: auto)

    def __post_init__(self):
        if not 1 <= len(self.models) <= 2:
            raise ValueError("a bench takes one model, or two to compare")
        if self.runs < 1 or self.warmup < 0 or self.threads < 1:
            raise ValueError("runs and threads must be >= 1, warmup >= 0")

    def runner_args(self, models: list[str], inputs: str | None, outputs: str | None) -> list[str]:
        """The runner's command-line arguments, with device-side paths substituted."""
        args = [*models, "--runs", str(self.runs), "--warmup", str(self.warmup), "--threads", str(self.threads),
                "--runtime", self.runtime, "--seed", str(self.seed)]
        for model in self.models:
            args += ["--name", model.stem]
        for convention in self.conventions:
            args += ["--input-convention", convention]
        if not self.xnnpack:
            args.append("--no-xnnpack")
        if inputs:
            args += ["--inputs", inputs]
        if outputs:
            args += ["--outputs", outputs]
        if self.keep_times:
            args.append("--keep-times")
        return args


def parse_runner_output(proc: subprocess.CompletedProcess, where: str) -> dict:
    """The runner's JSON (its last stdout line); its own error message, or the tail of stderr."""
    lines = [ln for ln in (proc.stdout or "").splitlines() if ln.strip().startswith("{")]
    payload = None
    if lines:
        try:
            payload = json.loads(lines[-1])
        except json.JSONDecodeError:
            payload = None
    if isinstance(payload, dict) and payload.get("error"):
        raise DeviceError(f"{where}: {payload['error']}")
    if proc.returncode != 0 or not isinstance(payload, dict):
        tail = " | ".join(ln.strip() for ln in (proc.stderr or "").strip().splitlines()[-3:])
        raise DeviceError(f"{where}: the runner exited {proc.returncode} without a result"
                          + (f": {tail}" if tail else ""))
    return payload


def run_in_group(cmd: list[str], *, timeout: float, input=None, text: bool = False, env: dict | None = None,
                 stdin=None) -> subprocess.CompletedProcess:
    """``subprocess.run`` with output captured, the command in a session of its own, and its whole process group
    killed when the timeout expires or the caller is interrupted (``TimeoutExpired`` is raised as by ``run``).

    Why: ``subprocess.run`` kills only its direct child, so whatever that
    child started (a shell's background job, a runner's helper, ssh's
    ProxyCommand) would go on running with parent pid 1. A process that
    starts a session of its own leaves the group and is out of reach.
    """
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=text, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group is proc.pid's until proc is reaped below
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

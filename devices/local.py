"""The build machine as a device: the runner in a fresh Python process.

A fresh process (``python -I``, a minimal environment) so the numbers do not
depend on what the calling process has loaded (TensorFlow, its thread pools)
or on variables such as ``OMP_NUM_THREADS`` or ``PYTHONPATH``. A profile's
``exec_prefix`` runs that process through a launcher: the emulated arm64
board (``devices/arm64/board``) runs an aarch64 Python under qemu-user.
"""

from __future__ import annotations

import os
import subprocess
import sys

from devices.transport_base import RUNNER, BenchRequest, parse_runner_output, run_in_group
from pipeline.core.errors import DeviceError

_KEEP_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")


def clean_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in _KEEP_ENV if k in os.environ}
    env.setdefault("PATH", os.defpath)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


class LocalTransport:
    def __init__(self, profile):
        self.profile = profile

    def bench(self, request: BenchRequest) -> dict:
        python = self.profile.python or sys.executable
        prefix = list(self.profile.exec_prefix)
        cmd = [*prefix, python, "-I", str(RUNNER), *request.runner_args(
            [str(m) for m in request.models], str(request.inputs) if request.inputs else None,
            str(request.outputs) if request.outputs else None)]
        try:
            proc = run_in_group(cmd, text=True, env=clean_env(), stdin=subprocess.DEVNULL,
                                timeout=self.profile.command_timeout_s)
        except FileNotFoundError:
            what = f"exec_prefix {prefix[0]!r}" if prefix else f"python {python!r}"
            raise DeviceError(f"local: {what} not found") from None
        except subprocess.TimeoutExpired:
            raise DeviceError(f"local: the bench took longer than {self.profile.command_timeout_s:g} s "
                              "(command_timeout_s in the profile)") from None
        return parse_runner_output(proc, "local")

"""A device over SSH (a Raspberry Pi, an ARM board): OpenSSH's client, nothing else.

Host keys are checked strictly and never accepted on first use: a bench
pushes a script that the device then runs, so a spoofed host would be handed
code and a model. Every remote argument goes through ``shlex.quote`` (the
remote side is a shell), and files travel as a tar stream over ssh's stdin,
so no remote path is ever parsed by scp. Each step has its own timeout, and
the temporary folder is removed in a ``finally``, also after a failure or a
timeout.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from devices.transport_base import RUNNER, BenchRequest, parse_runner_output, run_in_group
from pipeline.core.errors import DeviceError

_TMP_PATTERN = re.compile(r"^/[^\n]*/xedge\.[A-Za-z0-9]{6,}$")


def _quote(args) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


class SshTransport:
    def __init__(self, profile):
        self.profile = profile
        self.where = f"ssh {profile.user + '@' if profile.user else ''}{profile.host}"

    def ssh_command(self, remote: str) -> list[str]:
        p = self.profile
        cmd = ["ssh", "-T", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
               "-o", f"ConnectTimeout={max(1, int(p.connect_timeout_s))}",
               "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=2", "-p", str(p.port)]
        if p.known_hosts:
            known = os.path.expanduser(p.known_hosts)
            cmd += ["-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null"]
        if p.identity_file:
            cmd += ["-i", os.path.expanduser(p.identity_file), "-o", "IdentitiesOnly=yes"]
        if p.user:
            cmd += ["-l", p.user]
        # "--" ends ssh's options: a host that starts with "-" cannot become one.
        return [*cmd, "--", p.host, remote]

    def _run(self, remote: str, *, timeout: float, stdin: bytes | None = None,
             what: str) -> subprocess.CompletedProcess:
        try:
            proc = run_in_group(self.ssh_command(remote), input=stdin if stdin is not None else b"", timeout=timeout)
        except FileNotFoundError:
            raise DeviceError("ssh: the OpenSSH client (ssh) is not installed") from None
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{self.where}: {what} took longer than {timeout:g} s "
                              "(command_timeout_s / connect_timeout_s in the profile)") from None
        if proc.returncode == 255:
            raise DeviceError(f"{self.where}: {self._explain(proc.stderr.decode('utf-8', 'replace'))}")
        return proc

    def _explain(self, stderr: str) -> str:
        text = stderr.strip()
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
            return ("host key verification failed: the host's key is not in known_hosts or does not match it. "
                    "Check the key out of band, then add it (ssh-keyscan -p PORT HOST >> known_hosts); "
                    "it is never accepted automatically")
        if "Permission denied" in text:
            return "permission denied (publickey): check user and identity_file in the profile"
        if "Connection refused" in text:
            return f"connection refused on port {self.profile.port}: is sshd running?"
        if "timed out" in text:
            return f"connection timed out after {self.profile.connect_timeout_s:g} s"
        if "Could not resolve hostname" in text:
            return f"cannot resolve host {self.profile.host!r}"
        last = text.splitlines()[-1] if text else "ssh failed"
        return last

    def _python(self) -> str:
        return self.profile.python or "python3"

    def bench(self, request: BenchRequest) -> dict:
        p = self.profile
        base = p.workdir or "/tmp"
        proc = self._run(f"mktemp -d {shlex.quote(base.rstrip('/') + '/xedge.XXXXXXXX')}",
                         timeout=p.connect_timeout_s + 20, what="creating a temporary folder")
        folder = proc.stdout.decode().strip()
        if proc.returncode != 0 or not _TMP_PATTERN.match(folder):
            raise DeviceError(f"{self.where}: cannot create a temporary folder under {base}: "
                              f"{proc.stderr.decode('utf-8', 'replace').strip() or folder!r}")
        try:
            return self._bench_in(folder, request)
        finally:
            self._cleanup(folder)

    def _bench_in(self, folder: str, request: BenchRequest) -> dict:
        p = self.profile
        names = [f"model{i}.tflite" for i in range(len(request.models))]
        upload = [(RUNNER, "runner.py"), *zip(request.models, names)]
        if request.inputs:
            upload.append((request.inputs, "inputs.npy"))
        sent = self._run(f"tar -x -f - -C {shlex.quote(folder)}", stdin=_tar(upload),
                         timeout=p.connect_timeout_s + p.command_timeout_s, what="uploading the model")
        if sent.returncode != 0:
            raise DeviceError(f"{self.where}: cannot upload the model (tar exited {sent.returncode}): "
                              f"{sent.stderr.decode('utf-8', 'replace').strip()[-200:]}")
        args = request.runner_args(names, "inputs.npy" if request.inputs else None,
                                   "outputs" if request.outputs else None)
        limit = max(1, int(p.command_timeout_s))
        # The remote `timeout` stops the runner even if this side's connection is gone.
        remote = (f"cd {shlex.quote(folder)} && if command -v timeout >/dev/null 2>&1; "
                  f"then exec timeout {limit} {_quote([self._python(), 'runner.py', *args])}; "
                  f"else exec {_quote([self._python(), 'runner.py', *args])}; fi")
        proc = self._run(remote, timeout=p.command_timeout_s + p.connect_timeout_s, what="the bench")
        if proc.returncode == 124:  # the remote `timeout` stopped it
            raise DeviceError(f"{self.where}: the bench took longer than {limit} s (command_timeout_s in the "
                              "profile)")
        result = parse_runner_output(subprocess.CompletedProcess(proc.args, proc.returncode,
                                                                 proc.stdout.decode("utf-8", "replace"),
                                                                 proc.stderr.decode("utf-8", "replace")),
                                     self.where)
        if request.outputs:
            fetched = self._run(f"tar -c -f - -C {shlex.quote(folder)} outputs",
                                timeout=p.connect_timeout_s + p.command_timeout_s, what="fetching outputs")
            if fetched.returncode != 0:
                raise DeviceError(f"{self.where}: cannot fetch outputs: {fetched.stderr.decode().strip()}")
            _untar(fetched.stdout, Path(request.outputs))
        return result

    def _cleanup(self, folder: str) -> None:
        if not _TMP_PATTERN.match(folder):
            return
        try:
            self._run(f"rm -rf -- {shlex.quote(folder)}", timeout=self.profile.connect_timeout_s + 20,
                      what="removing the temporary folder")
        except DeviceError:
            pass  # the bench's own error matters more; a stale /tmp/xedge.* folder is harmless


def _tar(files) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for local, name in files:
            tar.add(str(local), arcname=name, recursive=False)
    return buf.getvalue()


def _untar(data: bytes, target: Path) -> None:
    """Extract the fetched ``outputs/`` folder's files into ``target``, refusing links and escapes."""
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp, filter="data")
        for path in (Path(tmp) / "outputs").glob("*.npy"):
            shutil.move(str(path), target / path.name)

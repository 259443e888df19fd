"""The ssh transport against a real OpenSSH server on 127.0.0.1, started by the test.

Generated host and user keys, an unused port, ``sshd -D -e`` as a subprocess;
the "device" is this machine with this venv's Python, so the runner really
runs and its JSON really travels back over ssh.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from devices.bench import bench
from devices.profile import DeviceProfile
from pipeline.core.errors import DeviceError
from tests.conftest import missing

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) from /proc/PID/stat, or None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": the name may hold spaces and ")"
    return int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, tuple[int, int]]:
    """Every live process below ``root``: pid -> (parent pid, start time); a reused pid has another start time."""
    stats = {int(e.name): _proc_stat(int(e.name)) for e in Path("/proc").iterdir() if e.name.isdigit()}
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        if stat is not None:
            children.setdefault(stat[0], []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = stats[pid]
        todo.extend(children.get(pid, []))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_if_same(pid: int, started: int) -> None:
    """SIGKILL ``pid`` only if it is still the process this test saw (not a pid reused since)."""
    stat = _proc_stat(pid)
    if stat is not None and stat[1] == started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "xedge-test", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().split()[:2]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not Path(SSHD).exists() or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        missing("needs the OpenSSH server and client (make system-deps installs openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    key_type, host_pub = _keygen(d / "host_key")
    _keygen(d / "user_key")
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = _free_port()
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'authorized_keys'}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LogLevel ERROR
""")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {key_type} {host_pub}\n")
    proc = subprocess.Popen([SSHD, "-D", "-f", str(d / "sshd_config"), "-e"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            missing(f"sshd did not start: {proc.stdout.read().strip()[-300:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    workdir = d / "remote tmp; $(touch PWNED) 'q'"
    workdir.mkdir()
    profile = DeviceProfile(name="sshd-test", transport="ssh", host="127.0.0.1", port=port, user=getpass.getuser(),
                            identity_file=str(d / "user_key"), known_hosts=str(d / "known_hosts"),
                            python=sys.executable, threads=1, runs=5, warmup=1, workdir=str(workdir),
                            connect_timeout_s=5, command_timeout_s=120)
    yield {"profile": profile, "dir": d, "workdir": workdir, "port": port, "pid": proc.pid}
    proc.terminate()
    proc.wait(timeout=10)


def test_bench_over_ssh_fetches_json_and_outputs_and_cleans_up(sshd, trained_tflite, calibration, tmp_path):
    inputs = np.stack(calibration.samples[:4])  # decoded pixels, as `xedge bench --inputs` sends
    result = bench([trained_tflite["int8"]], sshd["profile"], inputs=inputs, outputs=tmp_path / "out")
    assert result["runtime"]["name"] == "ai_edge_litert" and result["runs"] == 5
    assert result["device"] == {"name": "sshd-test", "transport": "ssh", "emulated": False}
    assert result["inputs"]["source"] == "file" and result["inputs"]["count"] == 4
    assert np.load(tmp_path / "out" / "int8_output0_float.npy").shape == (4, 10)
    assert list(sshd["workdir"].iterdir()) == []  # the temporary folder is gone


def test_paths_with_spaces_and_shell_characters(sshd, trained_tflite, tmp_path):
    folder = tmp_path / "a b&c"
    folder.mkdir()
    model = folder / "my model; $(touch PWNED) `id` 'x'.tflite"
    shutil.copy(trained_tflite["float"], model)
    result = bench([model], sshd["profile"])
    assert result["model"]["name"] == model.stem
    assert list(sshd["workdir"].iterdir()) == []
    for where in (Path.home(), sshd["workdir"].parent, tmp_path, folder, Path.cwd()):
        assert not (where / "PWNED").exists()


def test_unknown_host_key_is_refused_never_accepted(sshd, trained_tflite, tmp_path):
    other = tmp_path / "other_key"
    key_type, pub = _keygen(other)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd['port']} {key_type} {pub}\n")
    before = known.read_text()
    profile = replace(sshd["profile"], known_hosts=str(known))
    with pytest.raises(DeviceError, match="host key verification failed"):
        bench([trained_tflite["float"]], profile)
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(DeviceError, match="never accepted automatically"):
        bench([trained_tflite["float"]], replace(profile, known_hosts=str(empty)))
    assert known.read_text() == before and empty.read_text() == ""


def test_command_timeout_stops_and_cleans_up(sshd, trained_tflite):
    profile = replace(sshd["profile"], command_timeout_s=2, runs=1_000_000, warmup=0)
    start = time.monotonic()
    with pytest.raises(DeviceError, match="took longer than"):
        bench([trained_tflite["float"]], profile)
    assert time.monotonic() - start < 30
    assert list(sshd["workdir"].iterdir()) == []


def test_connection_refused_is_one_clear_error(sshd, trained_tflite):
    profile = replace(sshd["profile"], port=_free_port())
    with pytest.raises(DeviceError, match="connection refused"):
        bench([trained_tflite["float"]], profile)


def test_device_dropping_mid_run_is_an_error_and_cleans_up(sshd, trained_tflite):
    """The connection dies while the runner runs (its sshd session is killed): a clear error, no leftovers."""
    import threading

    profile = replace(sshd["profile"], command_timeout_s=60, runs=1_000_000, warmup=0)
    outcome = {}

    def run():
        try:
            bench([trained_tflite["float"]], profile)
        except DeviceError as exc:
            outcome["error"] = str(exc)

    worker = threading.Thread(target=run)
    start = time.monotonic()
    worker.start()
    # Everything this test kills descends from the sshd it started: the session's sshd processes
    # (children of the listener) and, below them, the runner (runner.py on its command line).
    deadline = time.monotonic() + 60
    below = {}
    while time.monotonic() < deadline and worker.is_alive():
        below = _descendants(sshd["pid"])
        if any("runner.py" in _cmdline(pid) for pid in below):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the runner did not start under the test's sshd within 60 s: {outcome}")
    sessions = [pid for pid, (parent, _) in below.items() if parent == sshd["pid"]]
    assert sessions, below
    for pid in sessions:
        _kill_if_same(pid, below[pid][1])  # the device "drops": its session processes die mid-run
    worker.join(timeout=90)
    assert not worker.is_alive() and time.monotonic() - start < 90
    assert "error" in outcome, "a dropped device must be an error"
    assert "ssh" in outcome["error"].lower() or "connection" in outcome["error"].lower(), outcome["error"]
    for pid, (_, started) in below.items():
        _kill_if_same(pid, started)  # the orphaned runner, if it outlived its session
    deadline = time.monotonic() + 10
    while list(sshd["workdir"].iterdir()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert list(sshd["workdir"].iterdir()) == [], "the remote temp folder must be removed when the device is back"

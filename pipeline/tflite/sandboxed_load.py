"""Loading .tflite files nobody vouched for, without letting them crash or hang us.

TFLite's loader trusts its input: a corrupted flatbuffer can crash the whole
process (tensorflow/tensorflow#115308; the path-based loader does not run the
flatbuffer verifier at all). So an untrusted model is (1) read as bytes with a
size limit, (2) checked for the flatbuffer framing here, in Python, and (3)
loaded and invoked once in a child process with memory, CPU-time and
wall-clock limits. Only when the child succeeds does the caller build its own
interpreter, from the same bytes. Whatever goes wrong becomes one
``ModelLoadError("invalid model: ...")``.

The child is ``python -I`` (isolated: no ``PYTHONPATH``, no user
site-packages, neither the working directory nor the script's folder on
``sys.path``; the interpreter's own site-packages, which hold
``ai_edge_litert``, stay; the folder holding this package is appended after
them, so the child opens the model with the library's own
``pipeline.tflite.runtime.allocated``, XNNPACK fallback included) with a
minimal environment (``CHILD_ENV``), in a
session of its own so that a timeout kills everything it started. It sets its
limits itself, as its first statements: a ``preexec_fn`` would run Python
between fork and exec while TensorFlow's threads may hold locks, which Python
documents as a deadlock risk.

What this is: a separate process with resource limits, so that a malformed
model that crashes, hangs or exhausts memory in LiteRT's loader costs the
caller an error message instead of its process. What this is not: a security
boundary. The child runs as the same user, with the same file system and
network access, and no seccomp filter or namespace; a model crafted to
exploit a memory-safety bug in the loader to run code could do in the child
whatever the user can.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

from pipeline.core.artifacts import integrity
from pipeline.core.errors import ModelLoadError

MAX_TFLITE_BYTES = 2 * 1024**3  # flatbuffers cannot address more
DEFAULT_TIMEOUT_S = 120
DEFAULT_MEMORY_MB = 8192
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding pipeline/: the child runs this same code

# The child's first statements: its limits, from argv (model, memory MiB, CPU seconds).
_LIMITS = r"""
import resource, sys
_memory, _cpu = int(sys.argv[2]) * 2**20, int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (_memory, _memory))
resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu + 5))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
"""

# Environment variables the child keeps; everything else (PYTHONPATH, credentials, ...) is dropped.
CHILD_ENV = ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL")

# Runs in the child after _LIMITS: numpy, LiteRT and the library's interpreter (its XNNPACK fallback), found
# through the parent's own package root (argv[4]), appended after the isolated interpreter's own paths.
_CHILD = r"""
import json, sys
sys.path.append(sys.argv[4])
import numpy as np
from pipeline.tflite.runtime import allocated
data = open(sys.argv[1], "rb").read()
interpreter = allocated(data)
rng = np.random.default_rng(0)
inputs = interpreter.get_input_details()
for d in inputs:
    dtype = np.dtype(d["dtype"])
    if dtype.kind == "f":
        x = rng.uniform(-1, 1, size=d["shape"]).astype(dtype)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        x = rng.integers(info.min, int(info.max) + 1, size=d["shape"]).astype(dtype)
    else:
        x = np.zeros(d["shape"], dtype)
    interpreter.set_tensor(d["index"], x)
interpreter.invoke()
def desc(d):
    s, z = d["quantization"]
    return {"name": d["name"], "dtype": np.dtype(d["dtype"]).name, "shape": [int(v) for v in d["shape"]],
            "scale": float(s), "zero_point": int(z)}
print(json.dumps({"inputs": [desc(d) for d in inputs],
                  "outputs": [desc(d) for d in interpreter.get_output_details()]}))
"""


def precheck(data: bytes, name: str = "model") -> None:
    """Cheap structural checks that catch empty, text and truncated files with a clear reason."""
    if len(data) == 0:
        raise ModelLoadError(f"invalid model: {name} is empty")
    if len(data) < 16:
        raise ModelLoadError(f"invalid model: {name} is only {len(data)} bytes, too short for a TFLite flatbuffer")
    if data[4:8] != b"TFL3":
        hint = " (it looks like text)" if all(32 <= b < 127 or b in (9, 10, 13) for b in data[:64]) else ""
        raise ModelLoadError(f"invalid model: {name} is not a TFLite flatbuffer (no TFL3 identifier){hint}")
    (root,) = struct.unpack_from("<I", data, 0)
    if root < 8 or root + 4 > len(data):
        raise ModelLoadError(f"invalid model: {name} has a root offset ({root}) past the end of the file "
                             f"({len(data)} bytes); it is truncated or corrupt")


def read_model_bytes(path: str | os.PathLike) -> bytes:
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ModelLoadError(f"model not found: {path}") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder, not a .tflite file")
    if size > MAX_TFLITE_BYTES:
        raise ModelLoadError(f"invalid model: {path} is {size / 2**30:.1f} GiB, larger than any TFLite model can be")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None


class Probe:
    """A probe running in its child process; ``result()`` waits for it (``start_probe``)."""

    def __init__(self, data: bytes, name: str, timeout: float, memory_mb: int):
        precheck(data, name)
        self.name, self.timeout, self.memory_mb = name, timeout, memory_mb
        self._tmp = tempfile.mkdtemp(prefix="xedge-probe-")
        model = Path(self._tmp) / "model.tflite"
        model.write_bytes(data)
        env = {k: v for k, v in os.environ.items() if k in CHILD_ENV}
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
        # start_new_session: setsid() in C between fork and exec, so a timeout can kill the whole group
        argv = [str(model), str(memory_mb), str(int(timeout) + 5), str(PACKAGE_ROOT)]
        self._proc = subprocess.Popen([sys.executable, "-I", "-c", _LIMITS + _CHILD, *argv], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=env, start_new_session=True)
        # never waited for (the caller failed first): kill the child and remove its copy of the model, when the
        # probe is collected or at the latest when the exit handlers run (weakref.finalize registers with atexit)
        self._cleanup = weakref.finalize(self, _abandon, self._proc, self._tmp, shutil.rmtree)

    def result(self) -> dict:
        proc, name = self._proc, self.name
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise ModelLoadError(f"invalid model: loading {name} did not finish in {self.timeout:.0f} s") from None
        finally:
            self._cleanup()
        if proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name
            raise ModelLoadError(f"invalid model: the TFLite loader crashed on {name} ({sig}); the file is corrupt "
                                 "or was built for another runtime")
        if proc.returncode != 0:
            lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
            errors = [ln for ln in lines if "Error" in ln or "error" in ln or "failed" in ln]
            reason = (errors or lines or ["unknown error"])[-1].strip()[:300]
            if "MemoryError" in reason or "bad_alloc" in reason:
                reason = f"it needs more than {self.memory_mb} MiB to load"
            raise ModelLoadError(f"invalid model: LiteRT cannot load {name}: {reason}")
        try:
            return json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise ModelLoadError(f"invalid model: probing {name} gave no result") from None


def _abandon(proc, tmp, rmtree) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    rmtree(tmp, ignore_errors=True)


def start_probe(data: bytes, name: str = "model", *, timeout: float = DEFAULT_TIMEOUT_S,
                memory_mb: int = DEFAULT_MEMORY_MB) -> Probe:
    """Start loading and invoking ``data`` once in a limited child process; the caller goes on meanwhile."""
    return Probe(data, name, timeout, memory_mb)


def probe(data: bytes, name: str = "model", *, timeout: float = DEFAULT_TIMEOUT_S,
          memory_mb: int = DEFAULT_MEMORY_MB) -> dict:
    """Load and invoke ``data`` once in a limited child process; return its input/output details."""
    return start_probe(data, name, timeout=timeout, memory_mb=memory_mb).result()


def check_manifest(path: str | os.PathLike, data: bytes) -> None:
    """If our manifest lies beside the model, the bytes must be the ones it describes.

    Bit flips in the weights leave a structurally valid flatbuffer that loads
    and runs, wrongly; only the sha256 recorded at conversion time shows it.
    A manifest that is there but unreadable would switch that check off
    silently, so it is an error too.
    """
    found = integrity(path, data)
    name = found.manifest.name
    if found.state == "unreadable":
        raise ModelLoadError(f"cannot check the integrity of {path}: its manifest {found.manifest} is unreadable "
                             f"({found.detail}); regenerate it (rerun convert) or remove it")
    if found.state == "mismatch":
        raise ModelLoadError(f"invalid model: {path} does not match the sha256 in {name}; it was "
                             "modified or corrupted after conversion")


def load_untrusted(path: str | os.PathLike, **limits) -> bytes:
    """Bytes of a .tflite that matches its manifest (if any) and loads and runs once in a sandboxed child."""
    data = read_model_bytes(path)
    check_manifest(path, data)
    probe(data, str(path), **limits)
    return data

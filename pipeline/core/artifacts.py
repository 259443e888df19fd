"""Writing outputs so that they carry their story and are never half-written.

Every artifact is written to a temporary file in the destination folder,
fsynced, then renamed over the target: a reader sees the old file or the new
one, never a torn one, even after SIGKILL or power loss. A manifest (JSON)
beside each artifact records hashes, versions and settings.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from pipeline.core.errors import ArtifactError, OutputExistsError

MANIFEST_SCHEMA = 1
TOOL_NAME = "xception-edge"
_VERSIONED = ("xception-edge", "tensorflow", "keras", "tf-keras", "tensorflow-model-optimization",
              "ai-edge-litert", "numpy", "pillow")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(path: str | os.PathLike) -> str:
    """One hash over a folder (a SavedModel): relative paths and contents, in sorted order."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def sha256_any(path: str | os.PathLike) -> str:
    return sha256_tree(path) if Path(path).is_dir() else sha256_file(path)


def size_any(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(q.stat().st_size for q in p.rglob("*") if q.is_file())
    return p.stat().st_size


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_writable(target: str | os.PathLike, *, force: bool) -> Path:
    """Refuse early (before hours of work) when the output exists or its folder is unusable."""
    target = Path(target)
    if target.exists() and not force:
        raise OutputExistsError(f"output exists: {target} (pass --force to overwrite, or --out to choose another)")
    folder = target.parent if str(target.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise ArtifactError(f"cannot write {target}: {folder} is not a folder")
    if folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write {target}: folder {folder} is read-only")
    return target


def _explain(exc: OSError, target: Path) -> ArtifactError:
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EFBIG: "the file size limit was reached",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }
    why = reasons.get(exc.errno, exc.strerror or str(exc))
    return ArtifactError(f"cannot write {target}: {why}; nothing was changed")


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically (temp file, fsync, rename, fsync folder)."""
    import signal

    target = Path(target)
    tmp_name = None
    # A file-size limit sends SIGXFSZ, which kills the process before Python can clean up.
    try:
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except (ValueError, AttributeError):  # not the main thread, or no such signal here
        previous = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
        tmp_name = None
        try:
            dir_fd = os.open(target.parent, os.O_RDONLY)
        except OSError:
            dir_fd = None
        if dir_fd is not None:
            try:
                os.fsync(dir_fd)
            except OSError:
                pass  # some file systems cannot fsync a folder; the rename is still atomic
            finally:
                os.close(dir_fd)
    except OSError as exc:
        raise _explain(exc, target) from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
        if previous is not None:
            signal.signal(signal.SIGXFSZ, previous)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def to_json(payload) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n").encode()


def atomic_write_json(target: str | os.PathLike, payload) -> Path:
    return atomic_write_bytes(target, to_json(payload))


def manifest_path_for(artifact: str | os.PathLike) -> Path:
    """``m.tflite`` -> ``m.manifest.json``."""
    p = Path(artifact)
    return p.with_name(p.stem + ".manifest.json") if p.suffix else p.with_name(p.name + ".manifest.json")


def read_manifest(path: str | os.PathLike) -> dict:
    """Read a manifest, checking that it is one of ours (for tools that compare artifacts)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read manifest {p}: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"manifest {p} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("tool") != TOOL_NAME or not isinstance(data.get("schema"), int):
        raise ArtifactError(f"{p} is not an xception-edge manifest")
    if data["schema"] > MANIFEST_SCHEMA:
        raise ArtifactError(f"manifest {p} has schema {data['schema']}; this version reads up to {MANIFEST_SCHEMA}")
    return data


def base_manifest(kind: str) -> dict:
    return {"tool": TOOL_NAME, "schema": MANIFEST_SCHEMA, "kind": kind, "created": now_iso(),
            "versions": versions(), "machine": {"platform": platform.platform(), "processor": platform.machine()}}

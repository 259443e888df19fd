"""Writing outputs so that they carry their story and are never half-written.

Every artifact is written to a temporary file in the destination folder,
fsynced, then renamed over the target: a reader sees the old file or the new
one, never a torn one, even after SIGKILL or power loss. A manifest (JSON)
beside each artifact records hashes, versions and settings.

An artifact and its manifest are two files, and no rename covers both. So
the manifest goes first, naming the new bytes and the ones they replace, and
the artifact follows: a kill between the two renames leaves the old artifact
beside a manifest that names it as replaced, which ``integrity`` reports as
an unfinished write rather than as a modified file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import signal
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

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


def versions(dists: tuple[str, ...] = _VERSIONED) -> dict[str, str | None]:
    """Python's version and each distribution's (None when it is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in dists:
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
    why = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return ArtifactError(f"cannot write {target}: {why}; nothing was changed")


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically (temp file, fsync, rename, fsync folder)."""
    target = Path(target)
    with _writing(target):
        _rename_into_place(_staged(target, data), target)
    return target


def atomic_write_pair(target: str | os.PathLike, data: bytes, manifest_target: str | os.PathLike,
                      manifest: dict) -> Path:
    """Write an artifact and its manifest as one unit (see the module docstring).

    The artifact's bytes are staged first, so a full disk or a size limit
    changes nothing; then the manifest is renamed into place with
    ``output.sha256`` (the new bytes) and ``output.replaces_sha256`` (the
    file being replaced, or None); then the artifact.
    """
    target = Path(target)
    with _writing(target):
        staged = _staged(target, data)
        try:
            manifest["output"]["sha256"] = sha256_bytes(data)
            manifest["output"]["replaces_sha256"] = sha256_file(target) if target.is_file() else None
            atomic_write_json(manifest_target, manifest)
            _pause_for_tests()
            _rename_into_place(staged, target)
        except BaseException:
            _unlink_quietly(staged)
            raise
    return target


PAUSE_ENV = "XEDGE_TEST_PAUSE_BETWEEN_WRITES"


def _pause_for_tests() -> None:
    """Fault injection for tests/test_bad_input.py only: with XEDGE_TEST_PAUSE_BETWEEN_WRITES=FILE set,
    stop between the manifest's rename and the artifact's, after creating FILE, so that a test can
    SIGKILL the process in that window every time rather than by the luck of a timer."""
    marker = os.environ.get(PAUSE_ENV)
    if not marker:
        return
    Path(marker).write_text(str(os.getpid()))
    deadline = time.monotonic() + 600  # a test that never kills us must not leave us behind for ever
    while time.monotonic() < deadline:
        time.sleep(0.5)


class _writing:
    """Around a write: SIGXFSZ ignored (a size limit would kill us before Python can clean up), and an
    OSError turned into one ArtifactError that says why."""

    def __init__(self, target: Path):
        self.target = target
        self.previous: Any = None  # the SIGXFSZ handler to restore

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except (ValueError, AttributeError):  # not the main thread, or no such signal here
            self.previous = None
        return self

    def __exit__(self, kind, exc, tb):
        if self.previous is not None:
            signal.signal(signal.SIGXFSZ, self.previous)
        if isinstance(exc, OSError):
            raise _explain(exc, self.target) from None
        return False


def _staged(target: Path, data: bytes) -> str:
    """``data`` in a fsynced temp file beside ``target``; its name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp_name)
        raise
    return tmp_name


def _rename_into_place(tmp_name: str, target: Path) -> None:
    try:
        os.replace(tmp_name, target)
    except BaseException:
        _unlink_quietly(tmp_name)
        raise
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(dir_fd)


def _unlink_quietly(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass


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


@dataclass(frozen=True)
class Integrity:
    """What the manifest beside an artifact says about its bytes (``integrity``).

    ``state``: "unchecked" (no manifest of ours beside it), "ok", "unreadable"
    (a manifest is there but cannot be read, so nothing could be checked),
    "unfinished" (the last write stopped between the manifest and the
    artifact: the bytes are the ones the manifest says were being replaced),
    or "mismatch" (bytes the manifest never named: modified or corrupted).
    """

    state: str
    manifest: Path
    detail: str = ""


def integrity(artifact: str | os.PathLike, data: bytes) -> Integrity:
    manifest = manifest_path_for(artifact)
    if not manifest.exists():
        return Integrity("unchecked", manifest)
    try:
        recorded = json.loads(manifest.read_bytes())
    except OSError as exc:
        return Integrity("unreadable", manifest, exc.strerror or str(exc))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Integrity("unreadable", manifest, f"not valid JSON: {exc}")
    if not isinstance(recorded, dict) or recorded.get("tool") != TOOL_NAME:
        return Integrity("unchecked", manifest)  # another tool's file that happens to share the name
    output = recorded.get("output")
    expected = output.get("sha256") if isinstance(output, dict) else None
    if not isinstance(expected, str) or not expected:
        return Integrity("unreadable", manifest, "it records no output.sha256")
    actual = sha256_bytes(data)
    if actual == expected:
        return Integrity("ok", manifest)
    if isinstance(output, dict) and actual == output.get("replaces_sha256"):
        return Integrity("unfinished", manifest)
    return Integrity("mismatch", manifest)

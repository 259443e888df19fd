"""Writing outputs so that they carry their story and are never half-written.

Every artifact is written to a temporary file in the destination folder,
fsynced, then renamed over the target: a reader sees the old file or the new
one, never a torn one, even after SIGKILL or power loss. A manifest (JSON)
beside each artifact records hashes, versions and settings.

An artifact and its manifest are two files side by side, and no rename covers
both; yet a reader must see the old pair or the new pair at every instant.
So the manifest that goes first is a bridge: it describes the new bytes and,
under ``previous``, the pair being replaced (its manifest, or only its hash
when it had none of ours). Readers pick the record that names the bytes they
hold (``describing``, ``integrity``): before the artifact's rename that is the
old pair, after it the new one. Then the final manifest (no ``previous``)
replaces the bridge. A kill at any point leaves a readable pair; SIGINT and
SIGTERM are held back over the renames (``interrupts.deferred``): one that
arrives before the artifact's rename puts the old manifest back, so an
interrupted write changed nothing, and one that arrives after it lets the
final manifest land first. With no previous artifact, a kill between the
renames leaves a bridge manifest beside no artifact: readers start from the
artifact's path, so they see no pair, as before the write.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import signal
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from pipeline.core import faults, interrupts, manifest_schema
from pipeline.core.errors import ArtifactError, OutputExistsError, Remedy

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
    for path in (target, manifest_path_for(target)):
        if path.is_dir():
            raise ArtifactError(f"cannot write {path}: it is a folder; nothing was changed")
    if target.exists() and not force:
        raise OutputExistsError(f"output exists: {target}", remedy=Remedy.FORCE)
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
                      manifest: dict, *, staged_hook: Callable[[dict], None] | None = None) -> Path:
    """Write an artifact and its manifest so that a reader sees the old pair or the new one (module docstring).

    Everything is staged first (a full disk or a size limit changes
    nothing); then the bridge manifest, the artifact and the final manifest
    are renamed into place. ``manifest["output"]["sha256"]`` is set here.
    ``staged_hook(manifest)`` runs once the artifact is staged and before the
    manifest is serialized: the last entries that depend on the write itself
    (an export's timing, which includes writing the model) go in there.
    """
    target, manifest_target = Path(target), Path(manifest_target)
    manifest["output"]["sha256"] = sha256_bytes(data)
    staged: list[str] = []
    with _writing(target):
        try:
            old_manifest = manifest_target.read_bytes() if manifest_target.is_file() else None
            staged.append(_staged(target, data))
            if staged_hook is not None:
                staged_hook(manifest)
            bridge = {**manifest, "previous": _replaced_record(target, old_manifest)}
            staged += [_staged(manifest_target, to_json(bridge)), _staged(manifest_target, to_json(manifest))]
            faults.pause("pair-staged")
            _commit(target, manifest_target, staged, old_manifest)
        finally:
            for name in staged:  # the ones renamed into place are gone already
                _unlink_quietly(name)
    return target


def _commit(target: Path, manifest_target: Path, staged: list[str], old_manifest: bytes | None) -> None:
    """Bridge manifest, artifact, final manifest, with interrupts held back (see the module docstring)."""
    model, bridge, final = staged
    with interrupts.deferred() as held:
        _rename_into_place(bridge, manifest_target)
        try:
            faults.pause("pair-between", held.pending)
            if held.pending():  # interrupted before the artifact moved: the old pair, as it was
                _put_back(manifest_target, old_manifest)
                return
            _rename_into_place(model, target)
        except BaseException:
            _put_back(manifest_target, old_manifest)
            raise
        faults.pause("pair-after", held.pending)
        _rename_into_place(final, manifest_target)


def _put_back(manifest_target: Path, old_manifest: bytes | None) -> None:
    if old_manifest is None:
        _unlink_quietly(str(manifest_target))
    else:
        _rename_into_place(_staged(manifest_target, old_manifest), manifest_target)


def _replaced_record(target: Path, old_manifest: bytes | None) -> dict | None:
    """What the bridge says about the file being replaced: its manifest of ours, or its hash alone (None: no file)."""
    if not target.is_file():
        return None
    try:
        old = json.loads(old_manifest) if old_manifest is not None else None
    except ValueError:
        old = None
    if isinstance(old, dict) and old.get("tool") == TOOL_NAME:
        old.pop("previous", None)
        return old
    return {"output": {"sha256": sha256_file(target)}, "manifest": None}


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
        raw = manifest_schema.read_regular(p)
    except OSError as exc:
        raise ArtifactError(f"cannot read manifest {p}: {exc.strerror or exc}") from None
    data = manifest_schema.parse(raw, p)
    if not isinstance(data, dict) or data.get("tool") != TOOL_NAME or not isinstance(data.get("schema"), int):
        raise ArtifactError(f"{p} is not an xception-edge manifest")
    if data["schema"] > MANIFEST_SCHEMA:
        raise ArtifactError(f"manifest {p} has schema {data['schema']}; this version reads up to {MANIFEST_SCHEMA}")
    return manifest_schema.check(data, p)


def base_manifest(kind: str) -> dict:
    return {"tool": TOOL_NAME, "schema": MANIFEST_SCHEMA, "kind": kind, "created": now_iso(),
            "versions": versions(), "machine": {"platform": platform.platform(), "processor": platform.machine()}}


@dataclass(frozen=True)
class Integrity:
    """What the manifest beside an artifact says about its bytes (``integrity``).

    ``state``: "unchecked" (no manifest of ours describes it), "ok", "unreadable"
    (a manifest is there but cannot be read, so nothing could be checked),
    or "mismatch" (bytes the manifest never named: modified or corrupted).
    ``record``: the manifest record that describes the bytes ("ok" only).
    """

    state: str
    manifest: Path
    detail: str = ""
    record: dict | None = None


def _output_sha(record) -> str | None:
    output = record.get("output") if isinstance(record, dict) else None
    sha = output.get("sha256") if isinstance(output, dict) else None
    return sha if isinstance(sha, str) and sha else None


def describing(manifest: dict, data: bytes) -> dict | None:
    """The record in ``manifest`` that names these bytes, or None.

    The manifest itself, or, while a pair write is between its renames, the
    manifest of the pair being replaced (``previous``; see the module
    docstring). None: neither names them, or they had no manifest of ours.
    """
    actual = sha256_bytes(data)
    if _output_sha(manifest) == actual:
        return {k: v for k, v in manifest.items() if k != "previous"}
    previous = manifest.get("previous")
    if isinstance(previous, dict) and _output_sha(previous) == actual and previous.get("tool") == TOOL_NAME:
        return previous
    return None


def integrity(artifact: str | os.PathLike, data: bytes) -> Integrity:
    manifest = manifest_path_for(artifact)
    if not manifest.exists():
        return Integrity("unchecked", manifest)
    try:
        recorded = json.loads(manifest_schema.read_regular(manifest))
    except OSError as exc:
        return Integrity("unreadable", manifest, exc.strerror or str(exc))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return Integrity("unreadable", manifest, f"not valid JSON: {exc}")
    if not isinstance(recorded, dict) or recorded.get("tool") != TOOL_NAME:
        return Integrity("unchecked", manifest)  # another tool's file that happens to share the name
    problems = manifest_schema.problems(recorded)
    if problems:
        return Integrity("unreadable", manifest, f"malformed: {problems[0]}")
    if _output_sha(recorded) is None:
        return Integrity("unreadable", manifest, "it records no output.sha256")
    record = describing(recorded, data)
    if record is not None:
        return Integrity("ok", manifest, record=record)
    if _output_sha(recorded.get("previous")) == sha256_bytes(data):
        return Integrity("unchecked", manifest)  # the file being replaced had no manifest of ours
    return Integrity("mismatch", manifest)

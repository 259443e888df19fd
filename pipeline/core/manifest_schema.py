"""Reading a manifest nobody vouched for: a regular file of bounded size, then a schema check of what readers use.

A manifest sits beside a model that may come from anywhere, and every reader
(the integrity check, the input convention, validate, sweep) trusts its
fields. So the file is opened without blocking and read only when it is a
regular file under ``MAX_MANIFEST_BYTES`` (a FIFO would block the reader for
ever, a symlink to ``/dev/zero`` would read until memory runs out), and the
parsed JSON is checked against ``SCHEMA`` before any field is used: a field
that is present must have its type and, where the set is closed, one of its
values. Fields are optional, so manifests written before a field existed
still read.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from pipeline.core.errors import ArtifactError
from pipeline.core.preprocessing import INPUT_CONVENTIONS
from pipeline.core.stage_timing import STAGES

MAX_MANIFEST_BYTES = 16 * 2**20  # a manifest lists calibration files and ops: a few hundred KiB at most

_INT = "int"  # an int that is not a bool
# Top-level fields -> type; nested fields as "parent.child". Only fields some reader uses are listed.
_DICT, _LIST = (dict, type(None)), (list, type(None))  # a section may be null (a float model has no calibration)
_SECONDS = (float, int)  # the stage timings (bench/ reads them)
SCHEMA: dict[str, object] = {
    "tool": str, "schema": _INT, "kind": str, "created": str,
    "versions": _DICT, "machine": _DICT, "settings": _DICT, "source": _DICT, "output": _DICT,
    "preprocessing": _DICT, "input_convention": _DICT, "calibration": _DICT, "io": _DICT, "labels": _LIST,
    "previous": _DICT, "xnnpack": _DICT, "ops": _DICT, "float_fallback": _DICT, "timing": _DICT,
    "settings.mode": str, "source.bytes": _INT, "source.classes": _INT, "source.input_shape": list,
    "output.path": str, "output.sha256": str, "output.bytes": _INT,
    "preprocessing.size": _INT, "preprocessing.fingerprint": str, "preprocessing.input_convention": str,
    "input_convention.name": str, "io.inputs": list, "io.outputs": list,
    "float_fallback.layers": list, "float_fallback.heldout": (dict, type(None)),
    **{f"timing.{stage}_s": _SECONDS for stage in (*STAGES, "total")},
}
# Fields whose values form a closed set.
CHOICES = {"preprocessing.input_convention": INPUT_CONVENTIONS, "input_convention.name": INPUT_CONVENTIONS}


def read_regular(path: str | os.PathLike, limit: int = MAX_MANIFEST_BYTES) -> bytes:
    """The bytes of ``path`` if it is a regular file (symlinks followed) of at most ``limit`` bytes; else
    ``OSError`` with the reason. Opened non-blocking, so a FIFO without a writer is refused, never waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"not a regular file ({_kind(info.st_mode)})")
        if info.st_size > limit:
            raise OSError(f"{info.st_size} bytes, over the {limit >> 20} MiB a manifest may have")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise OSError(f"over the {limit >> 20} MiB a manifest may have")
        return data
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def parse(raw: bytes, path: str | os.PathLike):
    """JSON, or ``ArtifactError`` naming the file."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"manifest {path} is not valid JSON ({type(exc).__name__}: {str(exc)[:100]})") from None


def problems(manifest: dict) -> list[str]:
    """Each field of ``manifest`` that breaks ``SCHEMA`` or ``CHOICES``, described (empty: it conforms)."""
    found = []
    for key, expected in SCHEMA.items():
        parent, _, child = key.partition(".")
        holder = manifest if not child else manifest.get(parent)
        name = child or parent
        if not isinstance(holder, dict) or name not in holder:
            continue
        value = holder[name]
        if not _is(value, expected):
            found.append(f"{key} is {type(value).__name__} {json.dumps(value)[:40]}")
        elif key in CHOICES and value not in CHOICES[key]:
            found.append(f"{key} is {value[:40]!r}, not one of {', '.join(CHOICES[key])}")
    labels = manifest.get("labels")
    if isinstance(labels, list) and not all(isinstance(label, str) for label in labels):
        found.append("labels holds something other than class names")
    return found


def _is(value, expected) -> bool:
    if expected == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def check(manifest: dict, path: str | os.PathLike) -> dict:
    """``manifest`` if it conforms to the schema, else one ``ArtifactError`` naming the file and the field."""
    found = problems(manifest)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ArtifactError(f"manifest {Path(path)} is malformed: {found[0]}{more}; regenerate it (rerun the "
                            f"command that wrote it) or remove it")
    return manifest

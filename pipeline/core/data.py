"""Finding the images in a folder: labels from subfolders, skips with reasons.

Only paths are listed here (never pixels), so a folder of any size can be
discovered in constant memory; decoding happens later, one file at a time.
Symlinked folders are not followed (a symlink loop cannot hang discovery);
symlinked files are, when they resolve.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipeline.core import artifacts
from pipeline.core.errors import DataError
from pipeline.core.preprocessing import IMAGE_SUFFIXES, PreprocessSpec, pixels_for

NPY_SUFFIX = ".npy"


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class Item:
    path: Path
    label: str | None  # class folder name, None in a flat folder

    @property
    def class_name(self) -> str:
        """The class folder name, for an item of a labeled folder (where every item has one)."""
        if self.label is None:
            raise DataError(f"{self.path} is not in a class folder")
        return self.label


@dataclass
class Discovery:
    root: Path
    items: list[Item]
    classes: list[str] | None  # sorted class folder names; None for a flat folder
    skipped: list[Skip] = field(default_factory=list)

    @property
    def labeled(self) -> bool:
        return self.classes is not None

    def by_class(self) -> dict[str | None, list[Item]]:
        groups: dict[str | None, list[Item]] = {}
        for item in self.items:
            groups.setdefault(item.label, []).append(item)
        return groups


def shown(path: str | os.PathLike) -> str:
    """A path as text that any report or terminal can hold: bytes of a name that is not UTF-8 (which Python
    keeps as lone surrogates, unencodable) are written as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _walk_files(root: Path, skipped: list[Skip]):
    """Yield regular files (or symlinks to them) below root in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=None):
        dirnames.sort()
        base = Path(dirpath)
        for name in list(dirnames):
            if (base / name).is_symlink():
                skipped.append(Skip(shown(base / name), "symlinked folder not followed"))
        for name in sorted(filenames):
            yield base / name


def _accept(path: Path, suffixes: frozenset[str], skipped: list[Skip]) -> bool:
    if not _utf8(path):  # class names and report rows are text: such a name could not be written
        skipped.append(Skip(shown(path), "file or folder name is not valid UTF-8; rename it"))
        return False
    if path.name.startswith("."):
        skipped.append(Skip(shown(path), "hidden file"))
        return False
    if path.suffix.lower() not in suffixes:
        skipped.append(Skip(shown(path), f"not an image (suffix {path.suffix or 'none'!r})"))
        return False
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except (OSError, RuntimeError):
            skipped.append(Skip(shown(path), "dangling or looping symlink"))
            return False
    if not path.is_file():
        skipped.append(Skip(shown(path), "not a regular file"))
        return False
    return True


def discover(root: str | os.PathLike, *, allow_npy: bool = False, what: str = "image folder") -> Discovery:
    """List usable files below ``root``.

    Layout: if ``root`` holds subfolders and no usable files of its own, each
    subfolder is a class (its files found recursively); otherwise the folder is
    flat (recursive, unlabeled).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{what} not found: {shown(root)}")
    if not root.is_dir():
        raise DataError(f"{what} is not a folder: {shown(root)}")
    suffixes = IMAGE_SUFFIXES | ({NPY_SUFFIX} if allow_npy else frozenset())
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot read {what} {root}: {exc.strerror or exc}") from None

    top_files = [Path(e.path) for e in entries if not e.is_dir(follow_symlinks=False)]
    subdirs = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    skipped: list[Skip] = []
    top_usable = [p for p in top_files if _accept(p, suffixes, skipped)]

    items: list[Item] = []
    classes: list[str] | None
    if subdirs and not top_usable:
        classes = []
        for sub in subdirs:
            if not _utf8(sub):
                skipped.append(Skip(shown(sub), "class folder name is not valid UTF-8; rename it"))
                continue
            found = [Item(p, sub.name) for p in _walk_files(sub, skipped) if _accept(p, suffixes, skipped)]
            if found:
                classes.append(sub.name)
                items.extend(found)
            else:
                skipped.append(Skip(shown(sub), "class folder without usable files"))
    else:
        classes = None
        items.extend(Item(p, None) for p in top_usable)
        for sub in subdirs:
            items.extend(Item(p, None) for p in _walk_files(sub, skipped) if _accept(p, suffixes, skipped))

    if not items:
        kinds = "images or .npy arrays" if allow_npy else "images"
        detail = f" ({len(skipped)} files skipped, e.g. {skipped[0].path}: {skipped[0].reason})" if skipped else ""
        raise DataError(f"no usable {kinds} in {what} {shown(root)}{detail}")
    return Discovery(root=root, items=items, classes=classes or None, skipped=skipped)


def write_model_size_rgb(folder: str | os.PathLike, out: str | os.PathLike, size: int) -> Path:
    """Each image of ``folder`` as a lossless RGB PNG already at the model's input size, in the same subfolders.

    The pixels are those every xedge stage computes (``pixels_for``: decode,
    centre crop, bilinear resize), so a client that resizes on its own, such as
    MediaPipe's ``ImageClassifier``, is handed exactly what ``xedge validate``
    measured and has nothing left to resize. Each file is written atomically.
    """
    found = discover(folder)
    out = Path(out)
    spec = PreprocessSpec(size=size)
    for item in found.items:
        target = out / item.path.relative_to(found.root).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(pixels_for(item.path, spec)).save(buffer, format="PNG")
        artifacts.atomic_write_bytes(target, buffer.getvalue())
    return out

"""A representative dataset from a folder of images (and ``.npy`` arrays).

Files are visited in the stratified order and decoded one at a time through
the one preprocessing definition; only the accepted sample is kept, as uint8
pixels (a quarter of the float size). Every file that was tried and refused is
listed with its reason, and the manifest gets each accepted file's sha256.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from calibrate.sampling import stratified_order
from pipeline.core.data import NPY_SUFFIX, Skip, discover
from pipeline.core.errors import CalibrationError, DataError
from pipeline.core.preprocessing import (
    LEGACY_CONVENTION,
    ImageError,
    PreprocessSpec,
    decode_rgb,
    model_input,
    read_bytes,
    resize_rgb,
    unscale,
)

DEFAULT_SIZE = 200
MAX_NPY_BYTES = 256 * 1024 * 1024


@dataclass
class CalibrationSet:
    root: Path
    spec: PreprocessSpec
    seed: int
    requested: int
    files: list[dict] = field(default_factory=list)  # {"path", "sha256", "label"}
    skipped: list[Skip] = field(default_factory=list)
    samples: list[np.ndarray] = field(default_factory=list, repr=False)  # uint8 pixels or float32 inputs
    candidates: int = 0
    _views: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.samples)

    def inputs(self, index: int) -> np.ndarray:
        """Sample ``index`` as the model input of ``spec.input_convention`` (float .npy samples are [-1, 1])."""
        sample = self.samples[index]
        if sample.dtype == np.uint8:
            return model_input(sample, self.spec.input_convention)
        return sample if self.spec.input_convention == LEGACY_CONVENTION else unscale(sample)

    def pixels(self) -> np.ndarray:
        """Every sample as uint8 pixels, stacked: what a runner that feeds each model in its own input convention
        takes (a float .npy sample, [-1, 1], becomes the nearest pixels)."""
        return np.stack([s if s.dtype == np.uint8 else np.rint(unscale(s)).astype(np.uint8)
                         for s in self.samples])

    def with_convention(self, convention: str) -> "CalibrationSet":
        """The same samples giving inputs in ``convention``; one view per convention, so conversions that
        keep their calibration by calibration set reuse it."""
        if convention == self.spec.input_convention:
            return self
        if convention not in self._views:
            self._views[convention] = replace(self, spec=replace(self.spec, input_convention=convention),
                                              _views={})
        return self._views[convention]

    def batches(self):
        """Batches of one, as the TFLite converter's representative_dataset expects."""
        for i in range(len(self.samples)):
            yield [self.inputs(i)[None, ...]]

    def to_manifest(self) -> dict:
        return {"dir": str(self.root), "count": len(self.samples), "requested": self.requested,
                "seed": self.seed, "candidates": self.candidates, "files": self.files,
                "skipped": [s.to_dict() for s in self.skipped]}


def _load_npy(path: Path, spec: PreprocessSpec) -> np.ndarray:
    """One sample from a .npy: uint8 HxWx3 pixels (preprocessed here) or float32 model input."""
    try:
        if path.stat().st_size > MAX_NPY_BYTES:
            raise ImageError(path, "array file too large")
        array = np.load(path, allow_pickle=False)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy's header parser raises many types on a crafted file: a skip
        raise ImageError(path, f"unreadable .npy ({type(exc).__name__}: {str(exc)[:80]})") from None
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ImageError(path, f".npy must hold one HxWx3 sample, got shape {array.shape}")
    if array.size == 0:
        raise ImageError(path, f".npy holds an empty image (shape {array.shape})")
    if array.dtype == np.uint8:
        return resize_rgb(array, spec.size)
    if array.dtype.kind != "f":
        raise ImageError(path, f".npy dtype {array.dtype} is neither uint8 pixels nor float inputs")
    if array.shape[:2] != (spec.size, spec.size):
        raise ImageError(path, f"float .npy must already be {spec.size}x{spec.size}x3 model input, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ImageError(path, "float .npy contains NaN or infinity")
    if array.min() < -1.0001 or array.max() > 1.0001:
        raise ImageError(path, "float .npy is outside [-1, 1]: it was not preprocessed for Xception")
    return array.astype(np.float32)


def _load_one(path: Path, spec: PreprocessSpec) -> tuple[np.ndarray, str]:
    if path.suffix.lower() == NPY_SUFFIX:
        sample = _load_npy(path, spec)
        return sample, hashlib.sha256(path.read_bytes()).hexdigest()
    data = read_bytes(path)
    return resize_rgb(decode_rgb(data, path), spec.size), hashlib.sha256(data).hexdigest()


def build_calibration_set(root: str | os.PathLike, spec: PreprocessSpec, *, size: int = DEFAULT_SIZE,
                          seed: int = 0, progress: Callable[[int, int], None] | None = None) -> CalibrationSet:
    """Sample up to ``size`` usable files from ``root``; raise CalibrationError if none are usable."""
    if size < 1:
        raise CalibrationError(f"the calibration sample size must be at least 1, got {size}", setting="calib_size")
    try:
        found = discover(root, allow_npy=True, what="calibration folder")
    except DataError as exc:
        raise CalibrationError(str(exc)) from None
    cal = CalibrationSet(root=Path(root), spec=spec, seed=seed, requested=size, skipped=list(found.skipped))
    total = min(size, len(found.items))
    pixel_hashes: dict[str, int] = {}
    for item in stratified_order(found.by_class(), seed):
        if len(cal.samples) >= size:
            break
        cal.candidates += 1
        try:
            sample, digest = _load_one(item.path, spec)
        except ImageError as exc:
            cal.skipped.append(Skip(str(item.path), exc.reason))
            continue
        key = hashlib.sha256(sample.tobytes()).hexdigest()
        pixel_hashes[key] = pixel_hashes.get(key, 0) + 1
        cal.samples.append(sample)
        cal.files.append({"path": str(item.path.relative_to(cal.root)) if item.path.is_relative_to(cal.root)
                          else str(item.path), "sha256": digest, "label": item.label})
        if progress:
            progress(len(cal.samples), total)
    if not cal.samples:
        first = cal.skipped[0] if cal.skipped else None
        hint = f" (e.g. {first.path}: {first.reason})" if first else ""
        raise CalibrationError(f"no usable calibration image in {root}: all {len(cal.skipped)} files were "
                               f"skipped{hint}")
    if len(cal.samples) > 1 and len(pixel_hashes) == 1:
        raise CalibrationError(f"the calibration set in {root} is one image repeated {len(cal.samples)} times; "
                               "quantization ranges from it would fit that image only. Use varied, real images")
    return cal

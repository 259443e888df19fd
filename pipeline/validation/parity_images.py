"""What ``xedge parity`` feeds: RGB images already at the model's input size, and each runtime's tensor from them.

Parity compares runtimes, not decoders or resizers. MediaPipe's
``ImageClassifier`` resizes on its own (no centre crop, its own
interpolation) and decodes JPEG with its own decoder, so the images are
decoded, centre-cropped and resized once here, through the one preprocessing
definition (as ``xedge validate`` does), and every runtime gets those same
uint8 pixels. ``runner_inputs`` is the one place that says what an
interpreter is fed from them: change the input convention there and every
target follows.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.core.data import Skip, discover
from pipeline.core.errors import ValidationError
from pipeline.core.preprocessing import (
    LEGACY_CONVENTION,
    ImageError,
    PreprocessSpec,
    model_tensor,
    pixels_for,
    quantize,
    scale,
)
from pipeline.validation.predict import default_workers
from pipeline.validation.validate import select_round_robin

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor as the interpreter reports it."""

    dtype: str
    shape: tuple[int, ...]
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return np.dtype(self.dtype).kind in "iu" and self.scale > 0

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "scale": self.scale, "zero_point": self.zero_point}


@dataclass(frozen=True)
class ModelIO:
    """A single-image classifier's input and output: (1, H, H, 3) in, (1, classes) out."""

    input: TensorSpec
    output: TensorSpec

    @property
    def size(self) -> int:
        return self.input.shape[1]

    @property
    def classes(self) -> int:
        return int(np.prod(self.output.shape[1:]))


def tensor_spec(detail: dict) -> TensorSpec:
    s, z = detail["quantization"]
    return TensorSpec(np.dtype(detail["dtype"]).name, tuple(int(v) for v in detail["shape"]), float(s), int(z))


def model_io(interpreter, name: str) -> ModelIO:
    """The model's input and output, checked to be one image in and one row of class scores out."""
    ins, outs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(ins) != 1 or len(outs) != 1:
        raise ValidationError(f"{name}: parity needs one input and one output, got {len(ins)} and {len(outs)}")
    io = ModelIO(tensor_spec(ins[0]), tensor_spec(outs[0]))
    shape = io.input.shape
    if len(shape) != 4 or shape[0] != 1 or shape[3] != 3 or shape[1] != shape[2]:
        raise ValidationError(f"{name}: parity needs a (1, H, H, 3) RGB image input, got {list(shape)}")
    if io.output.shape[0] != 1:
        raise ValidationError(f"{name}: parity needs a batch-1 output, got {list(io.output.shape)}")
    return io


# ---------------------------------------------------------------- the images


@dataclass
class Images:
    """Decoded model-size RGB pixels of the eval images, in the order they were chosen."""

    root: Path
    labeled: bool
    folders: list[str] | None
    found: int
    pixels: np.ndarray  # (N, H, H, 3) uint8
    chosen: int = 0  # after the image limit, before skips
    paths: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


def _decode(path: Path, spec: PreprocessSpec):
    try:
        return pixels_for(path, spec), None
    except ImageError as exc:
        return None, Skip(str(path), exc.reason)


def prepare_images(folder, size: int, *, limit: int | None = None, workers: int | None = None,
                   progress: Progress | None = None) -> Images:
    """Decode, centre-crop and resize the eval images once (``PreprocessSpec``), as ``xedge validate`` chooses them."""
    found = discover(folder, what="eval folder")
    chosen = select_round_robin(found.items, limit)
    spec = PreprocessSpec(size=size)
    skipped, paths, labels, rows = list(found.skipped), [], [], []
    with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="decode") as pool:
        for done, (item, (pixels, skip)) in enumerate(zip(chosen, pool.map(lambda it: _decode(it.path, spec),
                                                                             chosen)), start=1):
            if skip is not None:
                skipped.append(skip)
            else:
                paths.append(str(item.path))
                labels.append(item.label)
                rows.append(pixels)
            if progress:
                progress(done, len(chosen))
    if not rows:
        example = f" (e.g. {skipped[0].path}: {skipped[0].reason})" if skipped else ""
        raise ValidationError(f"no usable images in {folder}: all {len(chosen)} files were skipped{example}")
    return Images(found.root, found.labeled, found.classes, len(found.items), np.stack(rows), len(chosen),
                  paths, labels, skipped)


# ---------------------------------------------------------------- what each runtime is fed


@dataclass(frozen=True)
class Feed:
    """The same images for every runtime: the pixels, and the input tensor an interpreter gets from them."""

    pixels: np.ndarray   # (N, H, H, 3) uint8: what image clients (MediaPipe's ImageClassifier) are given
    tensor: np.ndarray   # (N, H, H, 3) in the model's input dtype: set as is on every interpreter
    convention: str      # how ``tensor`` was made from ``pixels``, said in the report
    paths: tuple[str, ...] = ()  # the files the pixels came from (a client may also decode them itself)


def pixel_input(io: ModelIO) -> bool:
    """A quantized input of scale 1 takes pixels themselves (plus its zero point); [-1, 1] can have no such scale."""
    return io.input.quantized and math.isclose(io.input.scale, 1.0)


def runner_inputs(io: ModelIO, pixels: np.ndarray, convention: str = LEGACY_CONVENTION) -> Feed:
    """What every runtime is fed for these pixels: the one place parity decides the input convention.

    Today's models take x / 127.5 - 1 in float32, or that quantized with the
    input's own scale and zero point exactly as TFLite's QUANTIZE op does. A
    quantized input of scale 1 takes the pixels plus its zero point (uint8:
    the pixels themselves). Interpreters (this machine's, the device runner)
    get ``tensor`` with nothing left to compute; image clients get ``pixels``
    and apply the model's metadata (NormalizationOptions) themselves.
    ``convention`` is the model's (``pipeline.tflite.input_convention``): a
    float model folded for pixels takes float32 pixels.
    """
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    spec = io.input
    if convention == "pixels" and np.dtype(spec.dtype).kind == "f":
        tensor = model_tensor(pixels, convention, spec.dtype, spec.scale, spec.zero_point)
        how = f"pixels as they are ({spec.dtype}; the model's [-1, 1] scaling is folded in)"
    elif pixel_input(io):
        tensor = quantize(pixels.astype(np.float32), spec.dtype, 1.0, spec.zero_point)
        how = f"pixels {'as they are' if spec.zero_point == 0 else f'+ ({spec.zero_point})'} ({spec.dtype})"
    elif spec.quantized:
        tensor = quantize(scale(pixels), spec.dtype, spec.scale, spec.zero_point)
        how = (f"x / 127.5 - 1 in float32, quantized to {spec.dtype} with scale {spec.scale:.6g} and zero point "
               f"{spec.zero_point} (as TFLite's QUANTIZE op)")
    elif np.dtype(spec.dtype).kind == "f":
        tensor = scale(pixels).astype(spec.dtype)
        how = f"x / 127.5 - 1 ({spec.dtype})"
    else:
        raise ValidationError(f"the model's {spec.dtype} input has no quantization scale: parity cannot tell what "
                              "it expects")
    return Feed(pixels=pixels, tensor=np.ascontiguousarray(tensor), convention=how)


__all__ = ["Feed", "Images", "ModelIO", "TensorSpec", "model_io", "prepare_images", "runner_inputs", "tensor_spec"]

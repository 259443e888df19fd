"""The one preprocessing definition: pixels in, model input out.

Training, calibration, validation and the device inputs all call this module,
and its spec's fingerprint goes into every manifest. A calibration set scaled
differently from training is the classic cause of "the int8 model predicts
garbage", so there is deliberately no other place that scales pixels.

Policy (``PreprocessSpec`` version 1):

* decode with Pillow, and only as JPEG, PNG, BMP, GIF, WebP or TIFF
  (``DECODED_FORMATS``): any other content is refused whatever the file's
  name, so a PostScript file named ``.jpg`` never reaches Pillow's EPS plugin,
  which would run Ghostscript on it; first frame of animations; EXIF
  orientation applied;
* every mode becomes RGB uint8 without silent clamping: 16-bit images are
  rescaled (``v / 257``), palette and alpha images are composited over white
  (what a viewer shows), CMYK goes through Pillow's conversion;
* aspect ratio: the centred square crop of the image, then a bilinear resize
  to ``size x size`` (no stretching, nothing padded);
* scale: ``x / 127.5 - 1`` in float32, exactly Keras's
  ``xception.preprocess_input`` ("tf" mode), giving [-1, 1]: what the Keras
  model is trained on.

Input conventions: what a *converted* model's input tensor holds, so that
every caller (validation, calibration, the device runner, a client reading
the model's metadata) feeds it the same way from the same decoded pixels p:

* ``signed_unit``: p / 127.5 - 1 (the training scale), in float32 or
  quantized with the model's own scale and zero point (every model before
  conventions existed; a manifest without the field means this one);
* ``pixels``: p itself, as uint8 (integer models: scale 1, zero point 0) or
  float32 (float models): the scaling is folded into the model's first
  convolution (``pipeline.model.stem``), so each of the 256 values is its own
  input level and a device feeds camera bytes as they are;
* ``pixels_int8``: p - 128 as int8 (scale 1, zero point -128), for runtimes
  that want int8 in and out (no uint8 -> int8 QUANTIZE op).

Files that cannot be decoded raise ``ImageError`` with a short reason, which
callers turn into a listed skip.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline.core.conventions import InputConvention
from pipeline.core.errors import DataError

# The formats docs/converting.md lists; Pillow tries no other plugin (``Image.open(..., formats=...)``).
DECODED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
_FORMATS_TEXT = "JPEG, PNG, BMP, GIF, WebP, TIFF"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 50_000_000  # about 7000x7000: larger images are rejected before any decoding
# Pillow's own decompression-bomb check (at open, before ours) warns from the same size; decode_rgb turns the
# warning into the skip. Set here because Pillow offers only this process-wide setting.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


INPUT_CONVENTIONS = tuple(c.value for c in InputConvention)
LEGACY_CONVENTION = "signed_unit"  # what a manifest or model from before input conventions means
PIXEL_CONVENTIONS = ("pixels", "pixels_int8")
# The integer input tensor of each pixel convention: (dtype, scale, zero point); float value = p for both.
PIXEL_TENSORS = {"pixels": ("uint8", 1.0, 0), "pixels_int8": ("int8", 1.0, -128)}


class ImageError(DataError):
    """One file is not a usable image; ``reason`` is short enough for a skip list."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class PreprocessSpec:
    size: int
    aspect: str = "center-crop"
    resize: str = "bilinear"
    color: str = "rgb"
    alpha_background: str = "white"
    scale: str = "x/127.5-1"
    version: int = 1
    input_convention: str = LEGACY_CONVENTION  # what the converted model's input holds (module docstring)

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 8:
            raise ValueError(f"preprocessing size must be an integer >= 8, got {self.size!r}")
        if self.aspect != "center-crop" or self.resize != "bilinear" or self.scale != "x/127.5-1":
            raise ValueError("only the version-1 policy (center-crop, bilinear, x/127.5-1) exists")
        check_convention(self.input_convention)

    def to_dict(self) -> dict:
        """The policy as hashed: ``signed_unit`` is left out, so fingerprints written before input
        conventions existed (which all mean it) still match, and a pixel model's fingerprint differs."""
        d = asdict(self)
        if d["input_convention"] == LEGACY_CONVENTION:
            del d["input_convention"]
        return d

    @property
    def fingerprint(self) -> str:
        """Stable short hash of the policy, so manifests can be compared for equal preprocessing."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {**asdict(self), "fingerprint": self.fingerprint}

    @property
    def normalization(self) -> tuple[float, float]:
        """(mean, std) with the model input = (pixel - mean) / std: what a client told by the model's metadata
        (NormalizationOptions) computes to feed a float input of this spec's convention."""
        return normalization(self.input_convention)


def check_convention(convention: str) -> str:
    if convention not in INPUT_CONVENTIONS:
        raise ValueError(f"unknown input convention {convention!r}; choose one of {', '.join(INPUT_CONVENTIONS)}")
    return convention


def recorded_convention(preprocessing: dict | None) -> str:
    """The input convention a manifest's ``preprocessing`` section records (none recorded: ``signed_unit``)."""
    return check_convention((preprocessing or {}).get("input_convention") or LEGACY_CONVENTION)


def normalization(convention: str) -> tuple[float, float]:
    """(mean, std) with model input = (p - mean) / std, for a float input's NormalizationOptions metadata.

    A folded float model (``pixels``) gets (0, 1): a client then feeds p itself, bit for bit what
    ``model_input`` gives; ``signed_unit`` gets (127.5, 127.5), which a client computes within one
    float32 ulp of ``scale``.
    """
    return (127.5, 127.5) if check_convention(convention) == LEGACY_CONVENTION else (0.0, 1.0)


def read_bytes(path: str | os.PathLike) -> bytes:
    """Read a file for decoding, refusing oversized or unreadable ones with a reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(path, "dangling symlink or missing file") from None
    except OSError as exc:
        raise ImageError(path, f"unreadable ({exc.strerror or exc})") from None
    if size == 0:
        raise ImageError(path, "empty file")
    if size > MAX_FILE_BYTES:
        raise ImageError(path, f"file too large ({size / 2**20:.0f} MiB > {MAX_FILE_BYTES // 2**20} MiB)")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(path, f"unreadable ({exc.strerror or exc})") from None


def _to_rgb(im, path) -> "np.ndarray":
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(im, dtype=np.float64)
        top = 65535.0 if values.size == 0 or values.max() <= 65535 else float(values.max())
        gray = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        values = np.asarray(im, dtype=np.float64)
        top = 1.0 if values.size == 0 or values.max() <= 1.0 else 65535.0
        gray = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def decode_rgb(data: bytes, path: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Decode image bytes to an HxWx3 uint8 RGB array, applying EXIF orientation."""

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im: Image.Image = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise ImageError(path, f"image too large ({width}x{height} pixels > {MAX_PIXELS:,}); "
                                       "possible decompression bomb")
            if width * height == 0:
                raise ImageError(path, f"empty image ({width}x{height} pixels)")
            if getattr(im, "is_animated", False):  # not n_frames: counting a GIF's frames decodes all of them
                im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im, path)
        except ImageError:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise ImageError(path, "image too large; possible decompression bomb") from None
        except Image.UnidentifiedImageError:
            raise ImageError(path, f"not a recognised image format (decoded: {_FORMATS_TEXT})") from None
        except Exception as exc:  # noqa: BLE001 - a crafted file makes Pillow's decoders raise anything
            # (OverflowError from a BigTIFF offset, MemoryError, struct.error, ...): each is that file's skip.
            raise ImageError(path, f"corrupt or truncated image ({type(exc).__name__}: {str(exc)[:100]})") from None


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    return decode_rgb(read_bytes(path), path)


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, then bilinear-resize to size x size (uint8 in, uint8 out)."""

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 array, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = rgb[top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(square)
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def scale(pixels: np.ndarray) -> np.ndarray:
    """uint8 (or float) pixels in [0, 255] -> float32 in [-1, 1], exactly as Keras's Xception."""
    x = np.asarray(pixels, dtype=np.float32)
    x = x / np.float32(127.5)
    x = x - np.float32(1.0)
    return x


def scale_tf(pixels):
    """The same scaling as ``scale`` for tensors inside a tf.data pipeline."""
    import tensorflow as tf

    x = tf.cast(pixels, tf.float32)
    return x / 127.5 - 1.0


def model_input(pixels: np.ndarray, convention: str) -> np.ndarray:
    """Decoded pixels (uint8) -> the float value a model of ``convention`` takes; ``quantize`` then gives
    its integer input (exact for the pixel conventions: scale 1, integer values)."""
    if check_convention(convention) == LEGACY_CONVENTION:
        return scale(pixels)
    return np.asarray(pixels, dtype=np.float32)


def unscale(x: np.ndarray) -> np.ndarray:
    """[-1, 1] model inputs (float .npy samples) -> pixel values in [0, 255], float32."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip((x + np.float32(1.0)) * np.float32(127.5), 0, 255).astype(np.float32)


def model_tensor(pixels: np.ndarray, convention: str, dtype, scale_: float, zero_point: int) -> np.ndarray:
    """Decoded pixels -> the input tensor of a model of ``convention`` with this input dtype and quantization:
    what validation, calibration and the parity targets all feed (``devices/runner.py`` mirrors it)."""
    return quantize(model_input(pixels, convention), dtype, scale_, zero_point)


def pixels_for(path: str | os.PathLike, spec: PreprocessSpec) -> np.ndarray:
    """Decoded, oriented, cropped and resized uint8 pixels of one file (before scaling)."""
    return resize_rgb(load_rgb(path), spec.size)


def preprocess_file(path: str | os.PathLike, spec: PreprocessSpec) -> np.ndarray:
    """One file to one float32 model input of shape (size, size, 3), in the spec's input convention."""
    return model_input(pixels_for(path, spec), spec.input_convention)


def preprocess_pixels(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    return model_input(resize_rgb(rgb, spec.size), spec.input_convention)


def quantize(x: np.ndarray, dtype, scale_: float, zero_point: int) -> np.ndarray:
    """Float model input -> the integer input of a quantized model, exactly as TFLite's QUANTIZE op.

    TFLite divides in float32 and rounds halves to even (measured against the
    op itself, with and without XNNPACK, in tests/conversion/test_convert.py), then
    saturates; a float64 division differs on thousands of pixels of a 71x71
    image. At scale 1 (pixel inputs) pixels are integers, never halves, so
    every one of the 256 values is its own level. ``devices/runner.py``
    mirrors this function (it cannot import it).
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.asarray(x).astype(dtype)
    if not scale_:
        raise ValueError("a quantized input needs a non-zero scale")
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, dtype=np.float32) / np.float32(scale_)).astype(np.int64) + int(zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale_: float, zero_point: int) -> np.ndarray:
    if np.asarray(q).dtype.kind == "f":
        return np.asarray(q, dtype=np.float32)
    return ((np.asarray(q, dtype=np.float32) - np.float32(zero_point)) * np.float32(scale_)).astype(np.float32)

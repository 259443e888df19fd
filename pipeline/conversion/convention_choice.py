"""Which input convention a conversion gives its model, and the source that matches it.

Default: ``pixels`` wherever the input scaling folds into the model's stem
(``pipeline.model.stem``: the [-1, 1] scaling, or the model's own
Rescaling/Normalization layers): uint8 pixels for --int8, float32 pixels for
float, fp16, dynamic and --float-io (their NormalizationOptions metadata then
says mean 0 / std 1, so a client feeds the very values validation feeds).
A padded stem whose zero pad is no whole pixel (127.5) is padded with pixel
``STEM_PAD`` instead; the manifest states it with its effect measured on the
calibration images. A model with its own normalization layers takes pixels
whether or not they fold. int16x8 keeps [-1, 1] (its I/O is float32 or
int16). A model that cannot be folded (no Conv2D first, a SavedModel, a
quantization-aware model) keeps [-1, 1] and the manifest says why; asked for
explicitly, pixel input is then refused with that reason.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.conversion.converter_hooks import quantizer_route, staged_supported
from pipeline.conversion.settings import CALIBRATED_MODES, ConvertSettings
from pipeline.core import artifacts
from pipeline.core.errors import CalibrationError, ConversionError, ModelLoadError, Remedy
from pipeline.core.preprocessing import LEGACY_CONVENTION, PIXEL_CONVENTIONS, normalization
from pipeline.model.modelio import SourceModel
from pipeline.model.stem import Stem, StemPad, find_stem, fold_effect, fold_stem, input_domain
from pipeline.tflite.input_convention import model_convention, tensor_convention


def is_qat_model(source: SourceModel) -> bool:
    if source.model is None:
        return False
    return any(type(layer).__name__ in ("QuantizeLayer", "QuantizeWrapper", "QuantizeWrapperV2")
               for layer in source.model.layers)


def source_manifest(model_path: Path, model_bytes: bytes | None = None) -> dict:
    """Our manifest record of a float .tflite source's bytes (its preprocessing and labels carry over), or {}.

    The record that names the bytes (``artifacts.describing``): while a write
    is between its renames, the manifest of the pair being replaced.
    """
    try:
        data = json.loads(artifacts.manifest_path_for(model_path).read_text())
        model_bytes = Path(model_path).read_bytes() if model_bytes is None else model_bytes
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("tool") != artifacts.TOOL_NAME:
        return {}
    return artifacts.describing(data, model_bytes) or {}


def source_domain(source: SourceModel) -> str:
    """What the source's float input holds: "pixels" (folded, or a float .tflite that says so) or "signed_unit".

    A .tflite source is read as ``pipeline.tflite.input_convention`` reads any
    model: its metadata, then its manifest (parsed only, never run).
    """
    cache = source.cache
    if cache.domain is None:
        recorded = input_domain(source.model)  # pixels when the model starts with its own normalization
        if source.kind == "tflite":
            data = cache.float_tflite or (cache.unverified_tflite[0] if cache.unverified_tflite else None)
            manifest = (source_manifest(source.path, data) if data is not None else {}) or None
            recorded = _tflite_convention(data, manifest)
        cache.domain = "pixels" if recorded in PIXEL_CONVENTIONS else LEGACY_CONVENTION
    return cache.domain


def _tflite_convention(data: bytes | None, manifest: dict | None) -> str:
    """A .tflite source's convention; bytes that do not parse are left to the sandboxed probe to refuse."""
    if data is None:
        return LEGACY_CONVENTION
    try:
        return model_convention(data, manifest)[0]
    except ModelLoadError:
        raise
    except Exception:  # noqa: BLE001 - a corrupt flatbuffer: float_tflite's probe says so in its own words
        return LEGACY_CONVENTION


# The whole pixel that pads a stem whose zero pad is pixel 127.5; docs/converting.md has the measurements.
STEM_PAD = StemPad.NEAREST


def stem_of(source: SourceModel) -> Stem | str:
    """The source's stem (``pipeline.model.stem``), or why its input scaling cannot be folded; found once."""
    if source.cache.stem is None:
        found: Stem | str
        if source.model is None:
            found = "a SavedModel has no Keras layers to fold the [-1, 1] scaling into"
        elif is_qat_model(source):
            found = ("a quantization-aware model learned its input quantization on [-1, 1] inputs; its FakeQuant "
                     "ranges would not hold for pixels")
        else:
            try:
                found = find_stem(source.model)
            except NotImplementedError:  # a subclassed model without get_config
                found = "the model's layers cannot be read from its Keras config"
        source.cache.stem = found
    return source.cache.stem


def pixel_refusal(source: SourceModel) -> str | None:
    """Why the [-1, 1] scaling cannot be folded into this source, or None when it can (or it takes pixels)."""
    if source_domain(source) == "pixels":
        return None
    if source.kind == "tflite":
        return (f"{source.path.name} takes [-1, 1] input and a .tflite cannot be folded; convert the Keras model "
                "it came from")
    stem = stem_of(source)
    return stem if isinstance(stem, str) else None


def _pin_unavailable(settings: ConvertSettings) -> str | None:
    """Why an int8 pixel input cannot be pinned to [0, 255] here (it is, between the staged conversion's stages)."""
    if settings.mode != "int8" or settings.float_io:
        return None
    ok, why = staged_supported(quantizer_route())
    return None if ok else f"the pixel input's range is pinned in the staged conversion, unavailable here ({why})"


def resolve_convention(source: SourceModel, settings: ConvertSettings) -> tuple[str, str]:
    """The input convention this conversion gives the model, and why (module docstring)."""
    asked = settings.input_convention
    if asked is not None:
        return asked, _check_asked(source, settings, asked)
    if source_domain(source) == "pixels":
        return "pixels", _pixel_source_note(source)
    if settings.mode == "int16x8" and not settings.float_io:  # a pixel source (a splice donor) was answered above
        return LEGACY_CONVENTION, "int16x8 keeps [-1, 1] input (float32 or int16 I/O)"
    why = pixel_refusal(source) or _pin_unavailable(settings)
    if why:
        return LEGACY_CONVENTION, f"[-1, 1] input kept: {why}"
    return "pixels", "default: the [-1, 1] scaling folded into the first convolution" + _pad_note(stem_of(source))


def _pixel_source_note(source: SourceModel) -> str:
    stem = stem_of(source) if source.kind != "tflite" else None
    if source.kind == "tflite" or source.cache.unfolded is not None:
        return "the source takes pixels"
    if stem is None or isinstance(stem, str) or stem.domain != "pixels":
        first = source.model.layers[1].name if len(source.model.layers) > 1 else "?"
        return (f"the model takes pixels: its own normalization layer ({first}) comes first; kept as it is, "
                f"not folded ({stem})")
    return (f"the model takes pixels: its own normalization layers ({', '.join(stem.normalizing)}) folded into "
            f"the first convolution ({stem.conv})" + _pad_note(stem))


def _pad_note(stem: Stem | str) -> str:
    if isinstance(stem, str) or not stem.padded:
        return ""
    if stem.exact:
        return f"; its zero pad is pixel {stem.pad_pixels(STEM_PAD)[0]}, padded explicitly (exact)"
    zero = ", ".join(f"{p:g}" for p in dict.fromkeys(stem.zero_pixel))
    pad = ", ".join(str(p) for p in dict.fromkeys(stem.pad_pixels(STEM_PAD)))
    corrected = "; the border error is added back after the convolution" if STEM_PAD is StemPad.CORRECTED else ""
    return (f"; approximation: its zero pad is pixel {zero}, which no uint8 pixel is, so it pads with pixel "
            f"{pad} (exact inside the image, off on the padded border only{corrected}; measured effect in "
            "input_convention.stem)")


def _check_asked(source: SourceModel, settings: ConvertSettings, asked: str) -> str:
    if asked in PIXEL_CONVENTIONS:
        why = pixel_refusal(source) or _pin_unavailable(settings)
        if why:
            raise ConversionError(f"cannot give this model {asked} input: {why}", remedy=Remedy.SIGNED_UNIT_INPUT)
    elif source_domain(source) == "pixels" and source.cache.unfolded is None:
        raise ConversionError(f"{source.path.name} takes pixel input; it cannot be converted back to [-1, 1] "
                              "input: convert the Keras model it came from")
    return "asked for"


def resolved(source: SourceModel, settings: ConvertSettings) -> tuple[ConvertSettings, str]:
    """``settings`` with its input convention decided for ``source``, and why."""
    convention, why = resolve_convention(source, settings)
    return replace(settings, input_convention=convention), why


def converted_source(source: SourceModel, convention: str) -> SourceModel:
    """The source whose float input matches ``convention``: folded once (and cached) for the pixel ones."""
    want = "pixels" if convention in PIXEL_CONVENTIONS else LEGACY_CONVENTION
    cache = source.cache
    if want == LEGACY_CONVENTION and source_domain(source) != want:
        if cache.unfolded is None:  # _check_asked refuses this before any conversion asks
            raise ConversionError(f"{source.path.name} takes pixel input; it cannot be converted back to [-1, 1]")
        return cache.unfolded
    if want == LEGACY_CONVENTION or cache.unfolded is not None or source_domain(source) == "pixels" and (
            source.kind == "tflite"):
        return source
    if cache.folded is None:
        stem = pixel_refusal(source) if source.kind == "tflite" else stem_of(source)
        if stem is None or isinstance(stem, str):
            if source_domain(source) == "pixels":
                return source  # its own normalization layers take the pixels, kept as they are
            raise ConversionError(f"cannot give this model pixel input: {stem}")
        folded = SourceModel(source.path, source.kind, fold_stem(source.model, stem, STEM_PAD), source.input_shape,
                             source.classes)
        folded.cache.domain, folded.cache.unfolded, folded.cache.stem = "pixels", source, stem
        cache.folded = folded
    return cache.folded


def stem_record(source: SourceModel, representative, images: int = 32) -> dict | None:
    """The manifest's account of the folded stem (``Stem.describe``), with the effect of an approximate pad
    measured in float against the unfolded model on the first calibration images."""
    original = source.cache.unfolded
    stem = source.cache.stem
    if original is None or not isinstance(stem, Stem):
        return None
    record = stem.describe(STEM_PAD)
    if stem.exact:
        return record
    if representative is None or not len(representative):
        record["effect"] = {"skipped": "no calibration images to measure it on"}
        return record
    n = min(images, len(representative))
    pixels = np.stack([np.clip(np.rint(representative_in(representative, "pixels").inputs(i)), 0, 255)
                       for i in range(n)]).astype(np.uint8)
    record["effect"] = {**fold_effect(original.model, source.model, stem.domain, pixels),
                        "measured_on": "calibration images, float models"}
    return record


def representative_in(representative, convention: str):
    """The calibration set giving inputs in ``convention`` (a view over the same decoded pixels)."""
    if representative is None or representative.spec.input_convention == convention:
        return representative
    view = getattr(representative, "with_convention", None)
    if view is None:
        raise CalibrationError(f"the calibration set gives {representative.spec.input_convention} inputs but the "
                               f"model takes {convention}")
    return view(convention)


def io_type(settings: ConvertSettings) -> str:
    """The input type of an int8 model: float32 (--float-io), uint8 (pixels) or int8."""
    if settings.float_io:
        return "float32"
    return "uint8" if settings.input_convention == "pixels" else "int8"


def output_type(settings: ConvertSettings) -> str:
    """The output type of an int8 model: float32 (--float-io), int8 for pixels-int8 (int8 in and out, asked
    for), else uint8: what MediaPipe's clients take, whatever the input is."""
    if settings.float_io:
        return "float32"
    return "int8" if settings.input_convention == "pixels_int8" else "uint8"


def convention_record(convention: str, why: str, stem: dict | None = None) -> dict:
    """The manifest's account of the input: convention, why, and the (mean, std) that maps pixels to a float
    input, (p - mean) / std (what NormalizationOptions metadata carries); and the folded stem, if any."""
    mean, std = normalization(convention)
    record = {"name": convention, "why": why, "normalization": {"mean": mean, "std": std}}
    if stem is not None:
        record["stem"] = stem
    return record


def check_input_convention(model_bytes: bytes, settings: ConvertSettings) -> None:
    """An int8 model's input must state its convention exactly (uint8 or int8 at scale 1 for pixels)."""
    if settings.mode not in CALIBRATED_MODES or settings.mode == "int16x8":
        return  # int16 or float32 I/O of int16x8: no exact pixel levels to check
    stated = tensor_convention(model_bytes)
    if stated is not None and stated != settings.input_convention:
        raise ConversionError(f"the converted model's input is quantized as {stated}, not "
                              f"{settings.input_convention} (the input range could not be pinned to [0, 255])",
                              remedy=Remedy.SIGNED_UNIT_INPUT)

"""Which input convention a conversion gives its model, and the source that matches it.

Default: ``pixels`` wherever the [-1, 1] scaling folds exactly into the
model (``pipeline.model.fold``): uint8 pixels for --int8, float32 pixels for
float, fp16, dynamic and --float-io (their NormalizationOptions metadata then
says mean 0 / std 1, so a client feeds the very values validation feeds).
int16x8 keeps [-1, 1] (its I/O is float32 or int16). A model that cannot be
folded (same-padding stem, no Conv2D first, a SavedModel, a quantization-aware
model) keeps [-1, 1] and the manifest says why; asked for explicitly, pixel
input is then refused with that reason.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from pipeline.conversion.converter_hooks import staged_supported
from pipeline.conversion.settings import CALIBRATED_MODES, ConvertSettings
from pipeline.core import artifacts
from pipeline.core.errors import CalibrationError, ConversionError, ModelLoadError
from pipeline.core.preprocessing import LEGACY_CONVENTION, PIXEL_CONVENTIONS, normalization
from pipeline.model.fold import fold_input_scaling, fold_plan
from pipeline.model.modelio import SourceModel
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
    if "domain" not in source.cache:
        recorded = LEGACY_CONVENTION
        if source.kind == "tflite":
            data = source.cache.get("float_tflite") or source.cache.get("unverified_tflite", (None,))[0]
            manifest = (source_manifest(source.path, data) if data is not None else {}) or None
            recorded = _tflite_convention(data, manifest)
        source.cache["domain"] = "pixels" if recorded in PIXEL_CONVENTIONS else LEGACY_CONVENTION
    return source.cache["domain"]


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


def pixel_refusal(source: SourceModel) -> str | None:
    """Why the [-1, 1] scaling cannot be folded into this source exactly, or None when it can."""
    if source_domain(source) == "pixels":
        return None
    if source.kind == "tflite":
        return (f"{source.path.name} takes [-1, 1] input and a .tflite cannot be folded; convert the Keras model "
                "it came from")
    if source.model is None:
        return "a SavedModel has no Keras layers to fold the [-1, 1] scaling into"
    if is_qat_model(source):
        return ("a quantization-aware model learned its input quantization on [-1, 1] inputs; its FakeQuant "
                "ranges would not hold for pixels")
    try:
        config = source.model.get_config()
    except NotImplementedError:  # a subclassed model without get_config
        return "the model's layers cannot be read from its Keras config"
    plan = fold_plan(config)
    return plan if isinstance(plan, str) else None


def _pin_unavailable(settings: ConvertSettings) -> str | None:
    """Why an int8 pixel input cannot be pinned to [0, 255] here (it is, between the staged conversion's stages)."""
    if settings.mode != "int8" or settings.float_io:
        return None
    ok, why = staged_supported()
    return None if ok else f"the pixel input's range is pinned in the staged conversion, unavailable here ({why})"


def resolve_convention(source: SourceModel, settings: ConvertSettings) -> tuple[str, str]:
    """The input convention this conversion gives the model, and why (module docstring)."""
    asked = settings.input_convention
    if asked is not None:
        return asked, _check_asked(source, settings, asked)
    if source_domain(source) == "pixels":
        return "pixels", "the source takes pixels"
    if settings.mode == "int16x8" and not settings.float_io:  # a pixel source (a splice donor) was answered above
        return LEGACY_CONVENTION, "int16x8 keeps [-1, 1] input (float32 or int16 I/O)"
    why = pixel_refusal(source) or _pin_unavailable(settings)
    if why:
        return LEGACY_CONVENTION, f"[-1, 1] input kept: {why}"
    return "pixels", "default: the [-1, 1] scaling folded into the first convolution"


def _check_asked(source: SourceModel, settings: ConvertSettings, asked: str) -> str:
    if asked in PIXEL_CONVENTIONS:
        why = pixel_refusal(source) or _pin_unavailable(settings)
        if why:
            raise ConversionError(f"cannot give this model {asked} input: {why}; convert with "
                                  "--input-convention signed-unit")
    elif source_domain(source) == "pixels" and "unfolded" not in source.cache:
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
    if source_domain(source) == want:
        return source
    if want == LEGACY_CONVENTION:
        return source.cache["unfolded"]  # _check_asked refused the other cases
    if "folded" not in source.cache:
        why = pixel_refusal(source)
        if why:
            raise ConversionError(f"cannot give this model pixel input: {why}")
        folded = SourceModel(source.path, source.kind, fold_input_scaling(source.model), source.input_shape,
                             source.classes)
        folded.cache.update({"domain": "pixels", "unfolded": source})
        source.cache["folded"] = folded
    return source.cache["folded"]


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
    """The input and output type of an int8 model: float32 (--float-io), uint8 (pixels) or int8."""
    if settings.float_io:
        return "float32"
    return "uint8" if settings.input_convention == "pixels" else "int8"


def convention_record(convention: str, why: str) -> dict:
    """The manifest's account of the input: convention, why, and the (mean, std) that maps pixels to a float
    input, (p - mean) / std (what NormalizationOptions metadata carries)."""
    mean, std = normalization(convention)
    return {"name": convention, "why": why, "normalization": {"mean": mean, "std": std}}


def check_input_convention(model_bytes: bytes, settings: ConvertSettings) -> None:
    """An int8 model's input must state its convention exactly (uint8 or int8 at scale 1 for pixels)."""
    if settings.mode not in CALIBRATED_MODES or settings.mode == "int16x8":
        return  # int16 or float32 I/O of int16x8: no exact pixel levels to check
    stated = tensor_convention(model_bytes)
    if stated is not None and stated != settings.input_convention:
        raise ConversionError(f"the converted model's input is quantized as {stated}, not "
                              f"{settings.input_convention} (the input range could not be pinned to [0, 255]); "
                              "convert with --input-convention signed-unit")

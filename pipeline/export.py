"""Float model -> .tflite in one of five modes, with a manifest that tells the story.

The representative dataset is an argument (anything with ``batches()``,
``to_manifest()`` and ``spec``): this module never finds or decodes images
itself, so the calibration data cannot drift from the one preprocessing
definition behind the caller's back.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from pipeline import artifacts
from pipeline.errors import CalibrationError, ConversionError
from pipeline.model import fold_input_scaling, fold_plan
from pipeline.modelio import SourceModel, load_source
from pipeline.preprocessing import (INPUT_CONVENTIONS, LEGACY_CONVENTION, PIXEL_CONVENTIONS, PreprocessSpec,
                                    normalization, recorded_convention)
from pipeline.tflite_info import stated_convention

MODES = ("float", "dynamic", "fp16", "int8", "int16x8")
CALIBRATED_MODES = ("int8", "int16x8")

Progress = Callable[[int, int], None]


class Representative(Protocol):
    spec: PreprocessSpec

    def __len__(self) -> int: ...

    def batches(self): ...

    def to_manifest(self) -> dict: ...


@dataclass(frozen=True)
class ConvertSettings:
    mode: str
    float_io: bool = False
    allow_float_fallback: bool = False
    per_channel: bool = True
    trust_model_code: bool = False
    optimize: bool = True
    calibrator: str = "fast"  # "fast" (min/max under XNNPACK, all cores) or "stock" (the converter's own)
    float_layers: tuple[str, ...] = ()  # Keras layers kept out of the quantized graph (pipeline.float_fallback)
    fallback: str = "float"  # what float_layers compute in: "float", or "int16" (int8 only; spliced int16x8 ops)
    # What the model's input holds (pipeline.preprocessing); None: the mode's default for this model
    # (``resolve_convention``: pixels where the scaling folds exactly into the model).
    input_convention: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "float_layers", tuple(str(name) for name in self.float_layers))
        if self.float_layers and self.mode not in CALIBRATED_MODES:
            raise ConversionError(f"float layers only apply to int8 and int16x8, not {self.mode}")
        if self.fallback not in ("float", "int16"):
            raise ConversionError(f"unknown fallback {self.fallback!r}; choose float or int16")
        if self.fallback == "int16" and self.mode != "int8":
            raise ConversionError(f"--fallback int16 keeps layers of an int8 model in int16: it applies to --int8, "
                                  f"not --{self.mode}")
        if self.mode not in MODES:
            raise ConversionError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.calibrator not in ("fast", "stock"):
            raise ConversionError(f"unknown calibrator {self.calibrator!r}; choose fast or stock")
        if self.input_convention is not None and self.input_convention not in INPUT_CONVENTIONS:
            raise ConversionError(f"unknown input convention {self.input_convention!r}; choose one of "
                                  f"{', '.join(INPUT_CONVENTIONS)}")
        if self.input_convention == "pixels_int8" and (self.mode != "int8" or self.float_io):
            raise ConversionError("the pixels_int8 input (int8 p - 128) is for --int8 models with integer I/O")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExportResult:
    path: Path
    manifest_path: Path
    manifest: dict
    model_bytes: bytes = field(repr=False)

    @property
    def summary(self) -> dict:
        m = self.manifest
        return {"mode": m["settings"]["mode"], "output": str(self.path),
                "source_bytes": m["source"]["bytes"], "output_bytes": m["output"]["bytes"],
                "int_ops": m["ops"]["int_ops"], "float_ops": m["ops"]["float_ops"],
                "calibration_samples": (m.get("calibration") or {}).get("count", 0),
                "xnnpack_partitions": m["xnnpack"]["partitions"], "xnnpack_outside": m["xnnpack"]["outside"],
                "xnnpack_refused": m["xnnpack"].get("refused"), "seconds": m["timing"]["total_s"],
                "input_convention": (m.get("input_convention") or {}).get("name")}


def default_output(model_path: Path, mode: str) -> Path:
    """``runs/x/model.keras`` -> ``runs/x/model_int8.tflite``; a SavedModel folder gets a sibling file."""
    model_path = Path(model_path)
    if model_path.is_dir():
        return model_path.parent / f"{model_path.name}_{mode}.tflite"
    return model_path.with_name(f"{model_path.stem}_{mode}.tflite")


def is_qat_model(source: SourceModel) -> bool:
    if source.model is None:
        return False
    return any(type(layer).__name__ in ("QuantizeLayer", "QuantizeWrapper", "QuantizeWrapperV2")
               for layer in source.model.layers)


# ---------------------------------------------------------------- input conventions


def source_domain(source: SourceModel) -> str:
    """What the source's float input holds: "pixels" (folded, or a float .tflite converted so) or "signed_unit"."""
    if "domain" not in source.cache:
        recorded = LEGACY_CONVENTION
        if source.kind == "tflite":
            recorded = recorded_convention(_source_manifest(source.path).get("preprocessing"))
        source.cache["domain"] = "pixels" if recorded in PIXEL_CONVENTIONS else "signed_unit"
    return source.cache["domain"]


def pixel_refusal(source: SourceModel) -> str | None:
    """Why the [-1, 1] scaling cannot be folded into this source exactly, or None when it can."""
    if source_domain(source) == "pixels":
        return None
    if source.kind == "tflite":
        return (f"{source.path.name} takes [-1, 1] input (no manifest beside it says pixels) and a .tflite cannot "
                "be folded; convert the Keras model it came from")
    if source.model is None:
        return "a SavedModel has no Keras layers to fold the [-1, 1] scaling into"
    if is_qat_model(source):
        return "a quantization-aware model learned its input quantization on [-1, 1] inputs"
    try:
        config = source.model.get_config()
    except NotImplementedError:  # a subclassed model without get_config
        return "the model's layers cannot be read from its Keras config"
    plan = fold_plan(config)
    return plan if isinstance(plan, str) else None


def _pin_unavailable(settings: ConvertSettings) -> str | None:
    """Why an int8 pixel input cannot be pinned to [0, 255] here (it is, between the staged conversion's stages)."""
    from pipeline.converter_hooks import staged_supported

    if settings.mode != "int8":
        return None
    ok, why = staged_supported()
    return None if ok else f"the pixel input's range is pinned in the staged conversion, unavailable here ({why})"


def resolve_convention(source: SourceModel, settings: ConvertSettings) -> tuple[str, str]:
    """The input convention this conversion gives the model, and why (for the manifest and the summary).

    Default: pixels (uint8 for --int8, float32 pixels for float, fp16, dynamic
    and --float-io) wherever the scaling folds exactly into the model; int16x8
    keeps [-1, 1] (its I/O is float32 or int16, never uint8). Asked for
    explicitly, a convention the model cannot take is refused.
    """
    asked = settings.input_convention
    domain = source_domain(source)
    if asked is not None:
        if asked in PIXEL_CONVENTIONS:
            why = pixel_refusal(source) or _pin_unavailable(settings)
            if why:
                raise ConversionError(f"cannot give this model {asked} input: {why}; convert with "
                                      "--input-convention signed-unit")
        elif domain == "pixels" and "unfolded" not in source.cache:
            raise ConversionError(f"{source.path.name} takes pixel input (its manifest); it cannot be converted "
                                  "back to [-1, 1] input: convert the Keras model it came from")
        return asked, "asked for"
    if domain == "pixels":
        return "pixels", "the source takes pixels"
    if settings.mode == "int16x8":
        return LEGACY_CONVENTION, "int16x8 keeps [-1, 1] input (float32 or int16 I/O)"
    why = pixel_refusal(source) or _pin_unavailable(settings)
    if why:
        return LEGACY_CONVENTION, f"[-1, 1] input kept: {why}"
    return "pixels", "default: the [-1, 1] scaling folded into the first convolution"


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
        return source.cache["unfolded"]  # resolve_convention refused the other cases
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
    """An integer model's input must state its convention exactly (uint8 or int8 at scale 1 for pixels)."""
    if settings.mode not in CALIBRATED_MODES:
        return
    stated = stated_convention(model_bytes)
    expected = settings.input_convention
    if settings.mode == "int16x8":
        return  # int16 or float32 I/O: no exact pixel levels to check
    if stated is not None and stated != expected:
        raise ConversionError(f"the converted model's input is quantized as {stated}, not {expected} (the input "
                              "range could not be pinned to [0, 255] with this TensorFlow); convert with "
                              "--input-convention signed-unit")


def _serving_function(source: SourceModel):
    """A batch-1 concrete function of the Keras model, for the converter to freeze.

    Given without a trackable object, the converter freezes the weights into
    constants itself, which works the same for Keras 3 and tf_keras models
    (with the model as trackable object it takes its SavedModel path, which
    leaves READ_VARIABLE ops behind for Keras 3). Freezing here as well cost
    another 2.5 s on Xception-299.
    """
    import tensorflow as tf

    model = source.model
    spec = tf.TensorSpec((1, *source.input_shape), tf.float32, name="image")

    @tf.function(input_signature=[spec])
    def serve(image):
        return {"probabilities": model(image, training=False)}

    return serve.get_concrete_function()


def _make_converter(source: SourceModel):
    import tensorflow as tf

    if source.kind == "saved_model":
        return tf.lite.TFLiteConverter.from_saved_model(str(source.path), signature_keys=["serving_default"])
    return tf.lite.TFLiteConverter.from_concrete_functions([_serving_function(source)])


def _configure(converter, settings: ConvertSettings, representative, progress: Progress | None, qat: bool):
    import tensorflow as tf

    mode = settings.mode
    if mode == "float":
        return
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "dynamic":
        return
    if mode == "fp16":
        converter.target_spec.supported_types = [tf.float16]
        return
    if representative is not None:
        converter.representative_dataset = _replayable(representative, progress)
    if mode == "int8":
        # Builtins stay allowed so an unquantizable op falls back visibly; the
        # gate in export_tflite then names any heavy op left in float.
        # A quantization-aware model gets its ranges from its FakeQuant ops. Naming the INT8 op set
        # makes TF 2.21's converter check for a representative dataset before it has looked at the
        # graph, and refuse; the gate in export_tflite checks the ops all the same.
        if not qat:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                                   tf.lite.OpsSet.TFLITE_BUILTINS]
        if not settings.float_io:
            io = tf.uint8 if settings.input_convention == "pixels" else tf.int8
            converter.inference_input_type = io
            converter.inference_output_type = io
    elif mode == "int16x8":
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS]
        if not settings.float_io:
            converter.inference_input_type = tf.int16
            converter.inference_output_type = tf.int16
    if not settings.per_channel:
        converter._experimental_disable_per_channel = True  # noqa: SLF001 - the converter's only switch for it


def _replayable(representative, progress: Progress | None):
    """The converter's representative_dataset: a generator function (called again, it replays the samples)."""
    total = len(representative)

    def samples():
        for i, batch in enumerate(representative.batches(), 1):
            yield batch
            if progress:
                progress(i, total)

    return samples


def convert_bytes(source: SourceModel, settings: ConvertSettings, representative=None,
                  progress: Progress | None = None, calibration_record: dict | None = None) -> bytes:
    """Run the TFLite converter; its native log is kept for the error message, not printed.

    ``calibration_record`` (a dict) receives which calibrator ran, for the manifest.
    """
    from pipeline.converter_hooks import fast_calibration, fast_freeze
    from pipeline.quiet import native_stderr_captured

    settings, _ = resolved(source, settings)
    source = converted_source(source, settings.input_convention)
    representative = representative_in(representative, settings.input_convention)
    qat = is_qat_model(source)
    if source.kind == "tflite":
        return _from_float_tflite(source, settings, representative, progress, calibration_record)
    if settings.mode in CALIBRATED_MODES and representative is None and not qat:
        raise CalibrationError(f"--{settings.mode} needs calibration images: pass --calib DIR "
                               "(a folder of representative images), or convert a quantization-aware model")
    record = calibration_record if calibration_record is not None else {}
    if settings.float_layers:
        from pipeline.float_fallback import convert_spliced, method_for

        if method_for(settings) == "splice":  # converted whole, then the layers spliced in from a donor
            return convert_spliced(source, settings, representative, progress, record)
    if _use_stages(settings, representative, qat):
        return _staged_int8(source, settings, representative, progress, record)
    converter = _make_converter(source)
    _configure(converter, settings, representative, progress, qat)
    # int16x8 goes through the converter's old quantizer, which calibrates on its own: stock only.
    use_fast = settings.calibrator == "fast" and settings.mode == "int8" and representative is not None
    hook = fast_calibration(record) if use_fast else contextlib.nullcontext()
    if representative is not None and not use_fast:
        record["calibrator"] = "stock"
    keeper = contextlib.nullcontext()
    if settings.float_layers:
        from pipeline.float_fallback import keep_float

        keeper = keep_float(settings.float_layers, record=record)
    with native_stderr_captured() as log, hook, keeper, fast_freeze():
        try:
            return bytes(converter.convert())
        except (CalibrationError, ConversionError):
            raise
        except Exception as exc:  # noqa: BLE001 - the converter raises many private types
            error = exc
    raise _converter_failed(settings, error, log)


def _converter_failed(settings: ConvertSettings, error: Exception, log) -> ConversionError:
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    detail = log.tail(4)
    return ConversionError(f"TFLite converter failed in {settings.mode} mode: {first}"
                           + (f"\nconverter log (last lines):\n{detail}" if detail else ""))


def _use_stages(settings: ConvertSettings, representative, qat: bool) -> bool:
    """int8 from images runs as the converter's three stages, each kept for reuse (pipeline.converter_hooks)."""
    if settings.mode != "int8" or qat or representative is None:
        return False
    from pipeline.converter_hooks import staged_supported

    return staged_supported()[0]


def float_tflite(source: SourceModel) -> bytes:
    """The source's float32 .tflite, converted once per loaded model (a .tflite source: once its probe passed)."""
    if "unverified_tflite" in source.cache:
        data, pending = source.cache.pop("unverified_tflite")
        pending.result()  # raises ModelLoadError if the sandboxed load failed
        source.cache["float_tflite"] = data
    if "float_tflite" not in source.cache:
        source.cache["float_tflite"] = convert_bytes(source, ConvertSettings("float",
                                                                             input_convention=source_domain(source)))
    return source.cache["float_tflite"]


def _from_float_tflite(source: SourceModel, settings: ConvertSettings, representative, progress,
                       record: dict | None) -> bytes:
    """A float32 .tflite: its float32 conversion is itself; int8 is calibration plus the quantizer."""
    if settings.mode == "float":
        return float_tflite(source)
    if settings.mode != "int8":
        raise ConversionError(f"a .tflite model can be quantized with --int8 only, not --{settings.mode}; "
                              "convert the Keras model or SavedModel it came from for other modes")
    if representative is None:
        raise CalibrationError("--int8 needs calibration images: pass --calib DIR (a folder of representative "
                               "images)")
    return _staged_int8(source, settings, representative, progress, record if record is not None else {})


def _staged_int8(source: SourceModel, settings: ConvertSettings, representative, progress, record: dict) -> bytes:
    """Float conversion, calibration, quantizer: the first two are reused across calls on the same images."""
    from pipeline.converter_hooks import calibrate_float_model, pin_input_range, quantize_calibrated, staged_supported
    from pipeline.quiet import native_stderr_captured

    kept = source.cache.get("calibrated")
    if kept is None or kept[0] is not representative or kept[1] != settings.calibrator:
        samples = _replayable(representative, progress)
        float_model = float_tflite(source)
        calibration: dict = {}
        with native_stderr_captured() as log:
            try:
                calibrated = calibrate_float_model(float_model, samples, calibration,
                                                   fast=settings.calibrator == "fast")
            except (CalibrationError, ConversionError):
                raise
            except Exception as exc:  # noqa: BLE001 - the stock calibrator raises many types
                raise _converter_failed(settings, exc, log) from None
        if source_domain(source) == "pixels":
            calibrated = pin_input_range(calibrated, 0.0, 255.0)  # scale 1: each pixel its own level
            calibration["input_range"] = [0.0, 255.0]
        kept = (representative, settings.calibrator, calibrated, calibration)
        source.cache["calibrated"] = kept
    _, _, calibrated, calibration = kept
    record.update(calibration)
    record["stages"] = "float conversion, calibration, quantizer (pipeline.converter_hooks)"
    ok, why = staged_supported()
    if not ok:
        raise ConversionError(f"cannot quantize a .tflite with this TensorFlow: {why}; convert the Keras model")
    nodes = None
    if settings.float_layers:
        from pipeline.float_fallback import denylist, hooks_supported

        ok, why = hooks_supported()
        if not ok:
            raise ConversionError(f"cannot keep layers in float: {why}")
        nodes = denylist(calibrated, settings.float_layers, record)
    record["quantizer_route"] = "tensorflow" if "tensorflow" in sys.modules else "extension"  # converter_hooks
    with native_stderr_captured() as log:
        try:
            return quantize_calibrated(calibrated, io=io_type(settings), per_channel=settings.per_channel,
                                       denylisted_nodes=nodes)
        except Exception as exc:  # noqa: BLE001 - the quantizer raises many private types
            raise _converter_failed(settings, exc, log) from None


def check_integer_ops(info, settings: ConvertSettings) -> None:
    if settings.mode != "int8" or settings.allow_float_fallback or not info.heavy_float_ops:
        return
    names = ", ".join(f"{e['op']} ({e['output']})" for e in info.heavy_float_ops[:4])
    more = f" and {len(info.heavy_float_ops) - 4} more" if len(info.heavy_float_ops) > 4 else ""
    raise ConversionError(f"{len(info.heavy_float_ops)} compute ops stayed float in --int8 mode: {names}{more}; "
                          "pass --allow-float-fallback to accept a partly float model")


def export_tflite(model_path: str | os.PathLike, settings: ConvertSettings, *, out: str | os.PathLike | None = None,
                  representative: Representative | None = None, force: bool = False,
                  progress: Progress | None = None, source: SourceModel | None = None,
                  annotate: Callable[[bytes], dict] | None = None) -> ExportResult:
    """Convert ``model_path`` and write ``out`` plus its manifest atomically.

    ``annotate`` sees the final bytes before anything is written and returns
    manifest entries (the accuracy search records its measurements this way,
    so they describe exactly the bytes on disk).
    """
    from pipeline.tflite_info import inspect_tflite

    t0 = time.perf_counter()
    model_path = Path(model_path)
    out_path = Path(out) if out is not None else default_output(model_path, settings.mode)
    if out_path.suffix != ".tflite":
        raise ConversionError(f"output must end in .tflite, got {out_path}")
    manifest_path = artifacts.manifest_path_for(out_path)
    artifacts.check_writable(out_path, force=force)
    source = source or load_source(model_path, trust_code=settings.trust_model_code)
    settings, convention_note = resolved(source, settings)
    source = converted_source(source, settings.input_convention)
    representative = representative_in(representative, settings.input_convention)
    if representative is not None and settings.mode in CALIBRATED_MODES:
        if representative.spec.size != source.input_size:
            raise CalibrationError(f"calibration images are preprocessed to {representative.spec.size}px but the "
                                   f"model takes {source.input_size}px")
    t_load = time.perf_counter()
    uses_calibration = settings.mode in CALIBRATED_MODES and representative is not None
    calibration_record: dict = {}
    model_bytes = convert_bytes(source, settings, representative if uses_calibration else None, progress,
                                calibration_record)
    t_convert = time.perf_counter()
    optimizations = []
    if settings.optimize and settings.mode in CALIBRATED_MODES:
        model_bytes, optimizations = optimize_graph(model_bytes, source, representative)
    t_optimize = time.perf_counter()
    info = inspect_tflite(model_bytes)
    check_integer_ops(info, settings)
    check_input_convention(model_bytes, settings)
    from pipeline.tflite_optimize import xnnpack_report

    xnnpack = xnnpack_report(model_bytes)
    spec = representative.spec if representative is not None else PreprocessSpec(
        size=source.input_size, input_convention=settings.input_convention)
    source_manifest = _source_manifest(model_path) if source.kind == "tflite" else {}
    recorded = (source_manifest.get("preprocessing") or {}).get("fingerprint")
    source_convention = recorded_convention(source_manifest.get("preprocessing"))
    if recorded and recorded != replace(spec, input_convention=source_convention).fingerprint:
        raise CalibrationError(f"{model_path.name} was converted for preprocessing {recorded}, but the calibration "
                               f"images are preprocessed as {spec.fingerprint}; the int8 ranges would not match "
                               "what the model sees")

    manifest = artifacts.base_manifest("tflite")
    manifest.update({
        "settings": {**settings.to_dict(), "qat_source": is_qat_model(source),
                     "converter": "tf.lite.TFLiteConverter", "batch_size": 1},
        "source": {"path": str(model_path), "kind": source.kind, "sha256": artifacts.sha256_any(model_path),
                   "bytes": artifacts.size_any(model_path), "input_shape": list(source.input_shape),
                   "classes": source.classes},
        "output": {"path": out_path.name, "sha256": artifacts.sha256_bytes(model_bytes), "bytes": len(model_bytes)},
        "preprocessing": spec.describe(),
        "input_convention": convention_record(settings.input_convention, convention_note),
        "calibration": ({**representative.to_manifest(), "method": calibration_record} if uses_calibration
                        else None),
        "io": {"inputs": info.inputs, "outputs": info.outputs},
        "optimizations": optimizations,
        "xnnpack": xnnpack,
        "ops": {"histogram": info.op_histogram, "weight_dtypes": info.weight_dtypes,
                "int_ops": info.int_op_count, "float_ops": info.float_op_count,
                "left_float": info.float_ops, "operators": info.operator_count},
    })
    labels = _labels_beside(model_path) or source_manifest.get("labels")
    if labels is not None:
        manifest["labels"] = labels
    if annotate is not None:
        manifest.update(annotate(model_bytes))
    t_end = time.perf_counter()
    manifest["timing"] = {"load_s": round(t_load - t0, 3), "convert_s": round(t_convert - t_load, 3),
                          "optimize_s": round(t_optimize - t_convert, 3), "total_s": round(t_end - t0, 3)}
    artifacts.check_writable(out_path, force=force)  # it may have appeared while we worked
    artifacts.atomic_write_bytes(out_path, model_bytes)
    artifacts.atomic_write_json(manifest_path, manifest)
    return ExportResult(out_path, manifest_path, manifest, model_bytes)


CHECK_SAMPLES = 32


def float_outputs(source: SourceModel, inputs: np.ndarray) -> np.ndarray:
    """The float source model's outputs (probabilities) for a batch of preprocessed inputs."""
    # Small batches: a 299x299 Xception holds about 300 MB of activations per image.
    chunks = [inputs[i:i + 4] for i in range(0, len(inputs), 4)]
    if source.model is not None:
        return np.concatenate([np.asarray(source.model(c, training=False), dtype=np.float32) for c in chunks])
    if source.kind == "tflite":
        from pipeline.tflite_optimize import _outputs

        return _outputs(float_tflite(source), inputs)[0]
    import tensorflow as tf

    signature = tf.saved_model.load(str(source.path)).signatures["serving_default"]
    return np.concatenate([np.asarray(next(iter(signature(tf.constant(c)).values())), dtype=np.float32)
                           for c in chunks])


def optimize_graph(model_bytes: bytes, source: SourceModel, representative,
                   rewrites: tuple[Callable, ...] | None = None) -> tuple[bytes, list[dict]]:
    """Apply the XNNPACK-friendly rewrites, keeping them only if real data shows they do no harm.

    The rewrites are checked together first (stock model against the fully
    rewritten one: one run of each on the check images); only if that check
    fails is each rewrite checked on its own, in turn, so a harmful one is
    dropped and the others kept.
    """
    from pipeline.tflite_optimize import (check_rewrite, delegate_partitions, fuse_shared_add_relu,
                                          raise_negligible_add_inputs)

    staged: list[tuple[Callable, dict]] = []  # (rewrite, manifest entry) per rewrite that found work
    current = model_bytes
    for rewrite in rewrites or (fuse_shared_add_relu, raise_negligible_add_inputs):
        candidate, report = rewrite(current)
        if not report.count:
            continue
        entry = report.to_dict()
        entry["delegate_partitions"] = {"before": delegate_partitions(current),
                                        "after": delegate_partitions(candidate)}
        staged.append((rewrite, entry))
        current = candidate
    if not staged:
        return model_bytes, []
    entries = [entry for _, entry in staged]
    if representative is None or not len(representative):
        for entry in entries:  # a QAT model converted without images: nothing real to check on, keep the stock graph
            entry["applied"] = False
            entry["check"] = {"skipped": "no calibration images to check the rewrite on"}
        return model_bytes, entries
    n = min(CHECK_SAMPLES, len(representative))
    inputs = np.stack([representative.inputs(i) for i in range(n)])
    outputs_cache: dict = {}
    reference_cache: list = []

    def reference():  # the float model's outputs, computed only if a check needs them
        if not reference_cache:
            reference_cache.append(float_outputs(source, inputs))
        return reference_cache[0]

    together = check_rewrite(model_bytes, current, inputs, reference, outputs_cache)
    if together["accepted"]:
        names = [entry["name"] for entry in entries]
        for entry in entries:
            entry["check"] = {**together, "together_with": names}
            entry["applied"] = True
        return current, entries
    current = model_bytes
    for rewrite, entry in staged:  # each rewrite redone on what was kept so far
        candidate, _ = rewrite(current)
        entry["delegate_partitions"] = {"before": delegate_partitions(current),
                                        "after": delegate_partitions(candidate)}
        entry["check"] = check_rewrite(current, candidate, inputs, reference, outputs_cache)
        entry["applied"] = entry["check"]["accepted"]
        if entry["applied"]:
            current = candidate
    return current, entries


def _source_manifest(model_path: Path) -> dict:
    """Our manifest beside a float .tflite source (its preprocessing and labels carry over), or {}."""
    import json

    try:
        data = json.loads(artifacts.manifest_path_for(model_path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("tool") == artifacts.TOOL_NAME else {}


def _labels_beside(model_path: Path) -> list[str] | None:
    """Class names from a training run's labels.json, so the .tflite manifest carries them."""
    import json

    candidate = (model_path if model_path.is_dir() else model_path.parent) / "labels.json"
    if not candidate.is_file():
        return None
    try:
        data = json.loads(candidate.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("classes"), list):
        return [str(c) for c in data["classes"]]
    if isinstance(data, list):
        return [str(c) for c in data]
    return None

"""Which converter path makes a model, and what calibrated it.

A conversion takes one of these routes (``Route``): a float .tflite source
is its own float32 conversion, or is calibrated and quantized in stages;
layers kept in float are spliced in from a donor conversion; int8 from
images runs the converter's three stages (float conversion, calibration,
quantizer), each kept for reuse, on the float model with its BatchNorms
after a ReLU folded into their neighbours (``int8_float``,
``pipeline.tflite.scale_fold``); everything else is the TF converter in one
call. ``convert_model`` returns the bytes with the ``CalibrationRecord`` the
manifest carries. Each stage's time goes to ``pipeline.core.stage_timing``.
"""

from __future__ import annotations

import contextlib
import enum
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from pipeline.conversion import float_fallback
from pipeline.conversion.converter_hooks import (
    calibrate_float_model,
    denylist_supported,
    disable_per_channel,
    fast_calibration,
    fast_freeze,
    keep_float,
    pin_input_range,
    quantize_calibrated,
    quantizer_route,
    staged_supported,
)
from pipeline.conversion.convention_choice import (
    converted_source,
    io_type,
    is_qat_model,
    output_type,
    representative_in,
    resolved,
    source_domain,
)
from pipeline.conversion.int8_methods import chosen_ranges, combined, refine_int8
from pipeline.conversion.settings import CALIBRATED_MODES, ConvertSettings, Fallback, Progress, Rounding
from pipeline.core import interrupts
from pipeline.core.errors import CalibrationError, ConversionError, Remedy
from pipeline.core.tf_logs import native_stderr_captured
from pipeline.core.stage_timing import move, timed
from pipeline.model.modelio import KeptCalibration, SourceModel
from pipeline.tflite.equalize import equalize
from pipeline.tflite.scale_fold import fold_scales
from pipeline.tflite.splice import splice
from pipeline.tflite.weighted_layers import weighted_inputs


class Route(enum.StrEnum):
    """The converter path a model took."""

    SOURCE_TFLITE = "source-tflite"  # a float .tflite source's float32 conversion: its own bytes
    STAGED = "staged"  # float conversion, calibration, quantizer (a .tflite source's int8 too)
    SPLICED = "spliced"  # converted whole, then float layers spliced in from a donor conversion
    CONVERTER = "converter"  # the TF converter in one call (float, dynamic, fp16, int16x8, QAT, stock int8)


@dataclass
class CalibrationRecord:
    """What calibrated and quantized a model, as the manifest's ``calibration.method`` says it.

    Filled as the route runs; a field left ``None`` did not apply and is not
    written. The helpers of the calibrator, the float fallback and the int8
    methods report in dicts; ``absorb`` takes them in and refuses a key that
    is not a field here, so the manifest's keys are all listed in this class.
    """

    calibrator: str | None = None  # "fast-minmax" or "stock"
    fallback: str | None = None  # why the stock calibrator ran instead of the fast one
    samples: int | None = None  # calibration samples the fast calibrator saw
    tensors: int | None = None  # activation tensors it recorded ranges for
    workers: int | None = None  # interpreters it ran side by side
    seconds: float | None = None  # calibration time when it ran (a reused calibration keeps its first)
    input_range: list[float] | None = None  # the pixel input's range, pinned between the stages
    ranges: dict[str, Any] | None = None  # error-chosen activation ranges: what was clipped
    stages: str | None = None  # the staged route's stages
    quantizer_route: str | None = None  # "tensorflow" or "extension": which build of the quantizer ran
    int8_methods: dict[str, Any] | None = None  # learned rounding and bias correction: what each changed
    fallback_method: str | None = None  # how layers were kept in float: "mlir-denylist" or "splice"
    quantizer: str | None = None  # "mlir" when the quantizer was told to leave nodes in float
    float_layers: list[str] | None = None  # the layers kept in float
    denylisted_nodes: list[str] | None = None  # their nodes, as the quantizer names them
    splice: dict[str, Any] | None = None  # what splicing replaced
    scale_fold: dict[str, Any] | None = None  # BatchNorms after a ReLU folded into their neighbours (scale_fold)
    equalize: dict[str, Any] | None = None  # layer pairs whose channel ranges were balanced (equalize), when asked

    def absorb(self, info: dict[str, Any]) -> None:
        known = {f.name for f in fields(self)}
        unknown = set(info) - known
        if unknown:
            raise TypeError(f"calibration record has no field {', '.join(sorted(unknown))}")
        for key, value in info.items():
            setattr(self, key, value)

    def to_manifest(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Conversion:
    """A converted model, the route that made it and what calibrated it."""

    model: bytes
    route: Route
    calibration: CalibrationRecord


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
        converter.representative_dataset = Replay(representative, progress)
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
            converter.inference_input_type = tf.uint8 if io_type(settings) == "uint8" else tf.int8
            converter.inference_output_type = tf.uint8 if output_type(settings) == "uint8" else tf.int8
    elif mode == "int16x8":
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS]
        if not settings.float_io:
            converter.inference_input_type = tf.int16
            converter.inference_output_type = tf.int16
    if not settings.per_channel:
        disable_per_channel(converter)


class Replay:
    """The converter's representative_dataset: a generator function (called again, it replays the samples).

    ``seconds`` adds up, over every pass, the time from the first sample
    handed out to the end of the samples: the calibration the converter does
    inside its one call, which ``stage_timing`` then books as calibration.
    """

    def __init__(self, representative, progress: Progress | None):
        self.representative, self.progress = representative, progress
        self.seconds = 0.0

    def __call__(self):
        total = len(self.representative)
        started = None
        for i, batch in enumerate(self.representative.batches(), 1):
            started = time.perf_counter() if started is None else started
            yield batch
            if self.progress:
                self.progress(i, total)
        if started is not None:
            self.seconds += time.perf_counter() - started


def convert_model(source: SourceModel, settings: ConvertSettings, representative=None,
                  progress: Progress | None = None) -> Conversion:
    """Run the TFLite converter on the route ``settings`` call for; its native log is kept for the error
    message, not printed.

    The input convention is decided here (``pipeline.conversion.convention_choice``):
    a pixel-input model is converted from the folded source, calibrated on pixels.
    """
    with timed("probe"):
        settings, _ = resolved(source, settings)
        source = converted_source(source, settings.decided_convention)
        representative = representative_in(representative, settings.decided_convention)
        qat = is_qat_model(source)
        settings = methods_decided(settings, source, representative)
    if source.kind == "tflite":
        return _from_float_tflite(source, settings, representative, progress)
    if settings.mode in CALIBRATED_MODES and representative is None and not qat:
        raise CalibrationError(f"{settings.mode} needs calibration images, or a quantization-aware model to convert",
                               remedy=Remedy.CALIBRATION_IMAGES)
    if settings.float_layers and float_fallback.method_for(settings) == "splice":
        return convert_spliced(source, settings, representative, progress)
    if _use_stages(settings, representative, qat):
        return _staged_int8(source, settings, representative, progress)
    if settings.int8_methods or settings.ranges != "minmax" or settings.equalize:
        raise ConversionError("learned rounding, bias correction, error-chosen ranges and cross-layer equalization "
                              "need calibration images "
                              f"and the staged int8 conversion ({staged_supported(quantizer_route())[1]})")
    return _in_one_call(source, settings, representative, progress, qat)


def convert_bytes(source: SourceModel, settings: ConvertSettings, representative=None,
                  progress: Progress | None = None) -> bytes:
    """The converted model's bytes (``convert_model``, for callers that need no calibration record)."""
    return convert_model(source, settings, representative, progress).model


def _in_one_call(source: SourceModel, settings: ConvertSettings, representative, progress: Progress | None,
                 qat: bool) -> Conversion:
    """The TF converter in one call; the calibration inside it is timed by the samples it pulls."""
    record = CalibrationRecord()
    # int16x8 goes through the converter's old quantizer, which calibrates on its own: stock only.
    use_fast = settings.calibrator == "fast" and settings.mode == "int8" and representative is not None
    reported: dict[str, Any] = {}
    hook = fast_calibration(reported) if use_fast else contextlib.nullcontext()
    if representative is not None and not use_fast:
        record.calibrator = "stock"
    denylisted: dict[str, Any] = {}
    keeper: contextlib.AbstractContextManager = contextlib.nullcontext()
    if settings.float_layers:
        layers = settings.float_layers
        keeper = keep_float(lambda calibrated: float_fallback.denylist(calibrated, layers, denylisted))
    with timed("convert"):
        converter = _make_converter(source)
        _configure(converter, settings, representative, progress, qat)
        replay = getattr(converter, "representative_dataset", None)  # a Replay, given calibration images
        with native_stderr_captured() as log, hook, keeper, fast_freeze(converter), interrupts.surfaced():
            try:
                model = bytes(converter.convert())
            except (CalibrationError, ConversionError):
                raise
            except Exception as exc:  # noqa: BLE001 - the converter raises many private types
                raise converter_failed(settings, exc, log) from None
        if isinstance(replay, Replay):
            move(replay.seconds, "calibration")
    record.absorb(reported)
    record.absorb(denylisted)
    return Conversion(model, Route.CONVERTER, record)


def convert_spliced(source: SourceModel, settings: ConvertSettings, representative=None,
                    progress: Progress | None = None) -> Conversion:
    """Convert with ``settings.float_layers`` spliced in from the donor conversion (see ``float_fallback.method_for``).

    Bias correction runs on the spliced model, not on the host: a spliced
    layer's output shift differs from the int8 layer's it replaces, and the
    layers downstream are corrected for the shift they really receive.
    """
    settings = methods_decided(settings, source, representative)
    host = convert_model(source, replace(settings, float_layers=(), bias_correction=False), representative, progress)
    donor = donor_model(source, settings, representative)
    report: dict = {}
    with timed("quantizer"):
        spliced = splice(host.model, donor, settings.float_layers, record=report)
        methods: dict[str, Any] = {}
        if settings.bias_correction and representative is not None:
            kept = source.cache.calibrated
            with timed("methods"):
                spliced = refine_int8(spliced, int8_float_model(source, settings), representative,
                                      replace(settings, rounding=Rounding.NEAREST), methods,
                                      float_sums=kept.float_sums if kept is not None else None, progress=progress)
    record = replace(host.calibration, fallback_method="splice", float_layers=list(settings.float_layers),
                     splice=report)
    if methods:
        record.int8_methods = combined(host.calibration.int8_methods, methods["int8_methods"])
    return Conversion(spliced, Route.SPLICED, record)


def donor_model(source: SourceModel, settings: ConvertSettings, representative=None) -> bytes:
    """The conversion the spliced layers come from (``donor_settings``); the float one is the source's cached one."""
    spec = float_fallback.donor_settings(settings)
    return float_tflite(source) if spec.mode == "float" else convert_bytes(source, spec, representative)


def converter_failed(settings: ConvertSettings, error: Exception, log) -> ConversionError:
    """The converter's error in one line, with the last lines of its native log."""
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    detail = log.tail(4)
    return ConversionError(f"TFLite converter failed in {settings.mode} mode: {first}"
                           + (f"\nconverter log (last lines):\n{detail}" if detail else ""))


def methods_decided(settings: ConvertSettings, source: SourceModel, representative) -> ConvertSettings:
    """``settings`` with bias correction decided where it was left to the default (``None``): on where the
    staged int8 route calibrates on images, off on every other route (no calibration images to measure the
    shift on, a quantization-aware model's own ranges, or no stages to refine).

    Why on by default: it rewrites only int32 biases (same graph, ops and
    scales, so the device runs what ``validate`` measured), and on real
    pretrained models it halves the int8 model's disagreements with float
    (docs/validation.md); its float means come from the calibration's own
    pass, so it costs one int8 pass over the calibration images.
    """
    if settings.bias_correction is not None:
        return settings
    staged = settings.mode == "int8" and representative is not None and not is_qat_model(source) and (
        source.kind == "tflite" or _use_stages(settings, representative, False))
    return replace(settings, bias_correction=staged)


def _use_stages(settings: ConvertSettings, representative, qat: bool) -> bool:
    """int8 from images runs as the converter's three stages, each kept for reuse (pipeline.conversion.converter_hooks)."""
    if settings.mode != "int8" or qat or representative is None:
        return False

    return staged_supported(quantizer_route())[0]


def float_tflite(source: SourceModel) -> bytes:
    """The source's float32 .tflite, converted once per loaded model (a .tflite source: once its probe passed)."""
    cache = source.cache
    if cache.unverified_tflite is not None:
        data, pending = cache.unverified_tflite
        cache.unverified_tflite = None
        with timed("probe"):
            pending.result()  # raises ModelLoadError if the sandboxed load failed
        cache.float_tflite = data
    if cache.float_tflite is None:
        cache.float_tflite = convert_bytes(source, ConvertSettings("float", input_convention=source_domain(source)))
    return cache.float_tflite


def int8_float(source: SourceModel, settings: ConvertSettings) -> tuple[bytes, dict[str, Any]]:
    """The float model the staged int8 route calibrates, quantizes and pairs its layers with, and the manifest's
    records of how it was rewritten: the scales folded into it (``scale_fold``; exact in float, made once per
    source) and, where ``settings.equalize`` asks, its layer pairs equalized after the fold (``equalize``;
    exact up to float32 rounding, made once per source).

    Neither when the int8 model takes layers spliced from an int16x8 donor: the donor is converted from the
    source in one call, unfolded, so its layers would not compute what the folded model's neighbours expect.
    """
    if settings.fallback == Fallback.INT16:
        why = "layers are spliced from an unfolded int16x8 conversion"
        return float_tflite(source), {"scale_fold": {"applied": False, "reason": why},
                                      **({"equalize": {"applied": False, "reason": why}} if settings.equalize else {})}
    cache = source.cache
    if cache.scale_folded is None:
        cache.scale_folded = _exact_rewrite(fold_scales, float_tflite(source), "the fold")
    folded, report, _ = cache.scale_folded
    records: dict[str, Any] = {"scale_fold": _rewrite_record(report)}
    if not settings.equalize:
        return folded, records
    if cache.equalized is None:
        cache.equalized = _exact_rewrite(equalize, folded, "equalizing")
    equalized, balanced, seconds = cache.equalized
    return equalized, {**records, "equalize": _rewrite_record(balanced, seconds)}


def _exact_rewrite(rewrite: Callable[[bytes], tuple[bytes, Any]], model: bytes,
                   what: str) -> tuple[bytes, Any, float]:
    """``rewrite`` applied to ``model``: (its bytes, its report, seconds). An exact rewrite the model can do
    without must not fail a conversion: on a graph it cannot read, the model as it is and why (a str)."""
    with timed("calibration"):
        started = time.perf_counter()
        try:
            rewritten, report = rewrite(model)
        except Exception as exc:  # noqa: BLE001 - any reader error of any rewrite: the model stays as it is
            return model, f"{what} could not read this graph ({type(exc).__name__}: {exc})", 0.0
        return rewritten, report, round(time.perf_counter() - started, 3)


def _rewrite_record(report: Any, seconds: float | None = None) -> dict[str, Any]:
    """The manifest's record of one exact rewrite: what it changed, or why it was not applied."""
    if isinstance(report, str):
        return {"applied": False, "reason": report}
    return {"applied": True, **report.to_dict(), **({"seconds": seconds} if seconds is not None else {})}


def int8_float_model(source: SourceModel, settings: ConvertSettings) -> bytes:
    """``int8_float``'s model alone."""
    return int8_float(source, settings)[0]


def paired_float_model(source: SourceModel, settings: ConvertSettings, representative) -> bytes:
    """The float .tflite a conversion with ``settings`` pairs its layers with by tensor name (per-layer error, the
    budget search's ranking): the folded one where the staged int8 route quantized it, the plain one elsewhere."""
    if source.kind == "tflite" or _use_stages(settings, representative, is_qat_model(source)):
        return int8_float_model(source, settings)
    return float_tflite(source)


def _from_float_tflite(source: SourceModel, settings: ConvertSettings, representative,
                       progress: Progress | None) -> Conversion:
    """A float32 .tflite: its float32 conversion is itself; int8 is calibration plus the quantizer."""
    if settings.mode == "float":
        return Conversion(float_tflite(source), Route.SOURCE_TFLITE, CalibrationRecord())
    if settings.mode != "int8":
        raise ConversionError(f"a .tflite model can be quantized to int8 only, not to {settings.mode}; convert the "
                              "Keras model or SavedModel it came from for other modes")
    if representative is None:
        raise CalibrationError("int8 needs calibration images", remedy=Remedy.CALIBRATION_IMAGES)
    return _staged_int8(source, settings, representative, progress)


def _calibrated(source: SourceModel, settings: ConvertSettings, representative,
                progress: Progress | None) -> KeptCalibration:
    """The float model calibrated on ``representative`` (ranges chosen as asked, a pixel input pinned)."""
    samples = Replay(representative, progress)
    float_model, reported = int8_float(source, settings)
    with timed("calibration"):
        started = time.perf_counter()
        summed = weighted_inputs(float_model) if settings.bias_correction else []
        with native_stderr_captured() as log, interrupts.surfaced():
            try:
                calibrated, sums = calibrate_float_model(float_model, samples, reported,
                                                         fast=settings.calibrator == "fast", summed=summed)
            except (CalibrationError, ConversionError):
                raise
            except Exception as exc:  # noqa: BLE001 - the stock calibrator raises many types
                raise converter_failed(settings, exc, log) from None
        # the range search reports its own progress, image by image as counted, not as the images are read
        calibrated = chosen_ranges(calibrated, Replay(representative, None), settings, reported, progress)
        record = CalibrationRecord()
        record.absorb(reported)
        record.seconds = round(time.perf_counter() - started, 3)  # reused calibrations keep their first time
        if source_domain(source) == "pixels":
            calibrated = pin_input_range(calibrated, 0.0, 255.0)  # scale 1: each pixel its own level
            record.input_range = [0.0, 255.0]
    return KeptCalibration(representative, _calibration_key(settings), calibrated, record, sums)


def _calibration_key(settings: ConvertSettings) -> tuple[str, ...]:
    """What a kept calibration must have been made with to be reused (``KeptCalibration.method``)."""
    return (str(settings.calibrator), str(settings.ranges), str(settings.fallback != Fallback.INT16),
            str(settings.equalize))


def _staged_int8(source: SourceModel, settings: ConvertSettings, representative,
                 progress: Progress | None) -> Conversion:
    """Float conversion, calibration, quantizer: the first two are reused across calls on the same images."""
    kept = source.cache.calibrated
    if kept is None or kept.samples is not representative or kept.method != _calibration_key(settings):
        kept = _calibrated(source, settings, representative, progress)
        source.cache.calibrated = kept
    record = replace(kept.record, stages="float conversion, calibration, quantizer "
                                         "(pipeline.conversion.converter_hooks)")
    route = quantizer_route()
    ok, why = staged_supported(route)
    if not ok:
        raise ConversionError(f"cannot quantize a .tflite with this TensorFlow: {why}; convert the Keras model")
    with timed("quantizer"):
        nodes = None
        if settings.float_layers:
            ok, why = denylist_supported()
            if not ok:
                raise ConversionError(f"cannot keep layers in float: {why}")
            denylisted: dict[str, Any] = {}
            nodes = float_fallback.denylist(kept.model, settings.float_layers, denylisted)
            record.absorb(denylisted)
        record.quantizer_route = str(route)
        with native_stderr_captured() as log, interrupts.surfaced():
            try:
                quantized = quantize_calibrated(kept.model, route=route, io=io_type(settings),
                                                output=output_type(settings),
                                                per_channel=settings.per_channel, denylisted_nodes=nodes)
            except Exception as exc:  # noqa: BLE001 - the quantizer raises many private types
                raise converter_failed(settings, exc, log) from None
        methods: dict[str, Any] = {}
        with timed("methods"):
            refined = refine_int8(quantized, int8_float_model(source, settings), representative, settings, methods,
                                  float_sums=kept.float_sums, progress=progress)
        record.absorb(methods)
    return Conversion(refined, Route.STAGED, record)

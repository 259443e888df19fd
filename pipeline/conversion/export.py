"""Float model -> .tflite in one of five modes, with a manifest that tells the story.

The representative dataset is an argument (anything with ``batches()``,
``to_manifest()`` and ``spec``): this module never finds or decodes images
itself, so the calibration data cannot drift from the one preprocessing
definition behind the caller's back.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

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
    staged_supported,
)
from pipeline.conversion.convention_choice import (
    check_input_convention,
    convention_record,
    converted_source,
    io_type,
    is_qat_model,
    output_type,
    representative_in,
    resolved,
    source_domain,
    source_manifest,
    stem_record,
)
from pipeline.conversion.int8_methods import chosen_ranges, refine_int8
from pipeline.conversion.settings import CALIBRATED_MODES, ConvertSettings, Progress, Representative, default_output
from pipeline.core import artifacts, interrupts
from pipeline.core.errors import CalibrationError, ConversionError
from pipeline.core.preprocessing import PreprocessSpec, recorded_convention
from pipeline.core.quiet import native_stderr_captured
from pipeline.model.modelio import SourceModel, load_source
from pipeline.tflite.runtime import run_batch
from pipeline.tflite.splice import splice
from pipeline.tflite.tflite_info import inspect_tflite
from pipeline.tflite.tflite_metadata import ModelInfo, add_metadata, read_metadata
from pipeline.tflite.tflite_optimize import (
    check_rewrite,
    delegate_partitions,
    fuse_shared_add_relu,
    raise_negligible_add_inputs,
    xnnpack_report,
)


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
    The input convention is decided here (``pipeline.conversion.convention_choice``):
    a pixel-input model is converted from the folded source, calibrated on pixels.
    """
    settings, _ = resolved(source, settings)
    source = converted_source(source, settings.decided_convention)
    representative = representative_in(representative, settings.decided_convention)
    qat = is_qat_model(source)
    if source.kind == "tflite":
        return _from_float_tflite(source, settings, representative, progress, calibration_record)
    if settings.mode in CALIBRATED_MODES and representative is None and not qat:
        raise CalibrationError(f"--{settings.mode} needs calibration images: pass --calib DIR "
                               "(a folder of representative images), or convert a quantization-aware model")
    record = calibration_record if calibration_record is not None else {}
    if settings.float_layers:
        if float_fallback.method_for(settings) == "splice":  # converted whole, then the layers spliced in from a donor
            return convert_spliced(source, settings, representative, progress, record)
    if _use_stages(settings, representative, qat):
        return _staged_int8(source, settings, representative, progress, record)
    if settings.int8_methods or settings.ranges != "minmax":
        raise ConversionError("learned rounding, bias correction and error-chosen ranges need calibration images "
                              f"and the staged int8 conversion ({staged_supported()[1]})")
    converter = _make_converter(source)
    _configure(converter, settings, representative, progress, qat)
    # int16x8 goes through the converter's old quantizer, which calibrates on its own: stock only.
    use_fast = settings.calibrator == "fast" and settings.mode == "int8" and representative is not None
    hook = fast_calibration(record) if use_fast else contextlib.nullcontext()
    if representative is not None and not use_fast:
        record["calibrator"] = "stock"
    keeper: contextlib.AbstractContextManager = contextlib.nullcontext()
    if settings.float_layers:
        layers = settings.float_layers
        keeper = keep_float(lambda calibrated: float_fallback.denylist(calibrated, layers, record))
    with native_stderr_captured() as log, hook, keeper, fast_freeze(), interrupts.surfaced():
        try:
            return bytes(converter.convert())
        except (CalibrationError, ConversionError):
            raise
        except Exception as exc:  # noqa: BLE001 - the converter raises many private types
            error = exc
    raise _converter_failed(settings, error, log)


def convert_spliced(source, settings, representative=None, progress=None, record: dict | None = None) -> bytes:
    """Convert with ``settings.float_layers`` spliced in from the donor conversion (see ``float_fallback.method_for``)."""
    record = record if record is not None else {}
    host = convert_bytes(source, replace(settings, float_layers=()), representative, progress, record)
    report: dict = {}
    spliced = splice(host, donor_model(source, settings, representative), settings.float_layers, record=report)
    record.update({"fallback_method": "splice", "float_layers": list(settings.float_layers), "splice": report})
    return spliced


def donor_model(source, settings, representative=None) -> bytes:
    """The conversion the spliced layers come from (``donor_settings``); the float one is the source's cached one."""
    spec = float_fallback.donor_settings(settings)
    return float_tflite(source) if spec.mode == "float" else convert_bytes(source, spec, representative)


def _converter_failed(settings: ConvertSettings, error: Exception, log) -> ConversionError:
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    detail = log.tail(4)
    return ConversionError(f"TFLite converter failed in {settings.mode} mode: {first}"
                           + (f"\nconverter log (last lines):\n{detail}" if detail else ""))


def _use_stages(settings: ConvertSettings, representative, qat: bool) -> bool:
    """int8 from images runs as the converter's three stages, each kept for reuse (pipeline.conversion.converter_hooks)."""
    if settings.mode != "int8" or qat or representative is None:
        return False

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

    kept = source.cache.get("calibrated")
    if kept is None or kept[0] is not representative or kept[1] != (settings.calibrator, settings.ranges):
        samples = _replayable(representative, progress)
        float_model = float_tflite(source)
        calibration: dict = {}
        started = time.perf_counter()
        with native_stderr_captured() as log, interrupts.surfaced():
            try:
                calibrated = calibrate_float_model(float_model, samples, calibration,
                                                   fast=settings.calibrator == "fast")
            except (CalibrationError, ConversionError):
                raise
            except Exception as exc:  # noqa: BLE001 - the stock calibrator raises many types
                raise _converter_failed(settings, exc, log) from None
        calibrated = chosen_ranges(calibrated, samples, settings, calibration)
        calibration["seconds"] = round(time.perf_counter() - started, 3)  # reused calibrations keep their first time
        if source_domain(source) == "pixels":
            calibrated = pin_input_range(calibrated, 0.0, 255.0)  # scale 1: each pixel its own level
            calibration["input_range"] = [0.0, 255.0]
        kept = (representative, (settings.calibrator, settings.ranges), calibrated, calibration)
        source.cache["calibrated"] = kept
    _, _, calibrated, calibration = kept
    record.update(calibration)
    record["stages"] = "float conversion, calibration, quantizer (pipeline.conversion.converter_hooks)"
    ok, why = staged_supported()
    if not ok:
        raise ConversionError(f"cannot quantize a .tflite with this TensorFlow: {why}; convert the Keras model")
    nodes = None
    if settings.float_layers:
        ok, why = denylist_supported()
        if not ok:
            raise ConversionError(f"cannot keep layers in float: {why}")
        nodes = float_fallback.denylist(calibrated, settings.float_layers, record)
    record["quantizer_route"] = "tensorflow" if "tensorflow" in sys.modules else "extension"  # converter_hooks
    with native_stderr_captured() as log, interrupts.surfaced():
        try:
            quantized = quantize_calibrated(calibrated, io=io_type(settings), output=output_type(settings),
                                            per_channel=settings.per_channel, denylisted_nodes=nodes)
        except Exception as exc:  # noqa: BLE001 - the quantizer raises many private types
            raise _converter_failed(settings, exc, log) from None
    return refine_int8(quantized, float_tflite(source), representative, settings, record)


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
                  annotate: Callable[[bytes], dict] | None = None,
                  optimize: Callable[[bytes], tuple[bytes, list[dict]]] | None = None) -> ExportResult:
    """Convert ``model_path`` and write ``out`` plus its manifest as one unit (``artifacts.atomic_write_pair``).

    ``annotate`` sees the final bytes before anything is written and returns
    manifest entries (the accuracy search records its measurements this way,
    so they describe exactly the bytes on disk; an exception it raises leaves
    nothing written). ``optimize`` replaces ``optimize_graph`` on the
    converted bytes: the accuracy search passes the one it measured each
    candidate with, so what is written is what it measured.
    """
    t0 = time.perf_counter()
    job = _ExportJob.prepare(Path(model_path), settings, out, representative, force, source)
    t_load = time.perf_counter()
    model_bytes, calibration_record = _convert_for(job, progress)
    t_convert = time.perf_counter()
    model_bytes, optimizations = _optimized(job, model_bytes, optimize)
    t_optimize = time.perf_counter()
    info = inspect_tflite(model_bytes)
    check_integer_ops(info, job.settings)
    check_input_convention(model_bytes, job.settings)
    spec, labels = _spec_and_labels(job)
    model_bytes = add_metadata(model_bytes, _model_info(job.source, job.settings, spec, labels))
    manifest = _manifest(job, model_bytes, info, spec, labels, calibration_record, optimizations)
    if annotate is not None:
        manifest.update(annotate(model_bytes))
    t_end = time.perf_counter()
    manifest["timing"] = {"load_s": round(t_load - t0, 3), "convert_s": round(t_convert - t_load, 3),
                          "optimize_s": round(t_optimize - t_convert, 3), "total_s": round(t_end - t0, 3)}
    artifacts.check_writable(job.out_path, force=force)  # it may have appeared while we worked
    artifacts.atomic_write_pair(job.out_path, model_bytes, job.manifest_path, manifest)  # manifest, then model
    return ExportResult(job.out_path, job.manifest_path, manifest, model_bytes)


@dataclass
class _ExportJob:
    """One export's resolved inputs: where it writes, the source as converted (folded for pixel input),
    the settings with their input convention decided, and the calibration set in that convention."""

    model_path: Path
    out_path: Path
    manifest_path: Path
    source: SourceModel
    original: SourceModel
    settings: ConvertSettings
    convention_note: str
    representative: Representative | None

    @classmethod
    def prepare(cls, model_path: Path, settings: ConvertSettings, out, representative, force: bool,
                source: SourceModel | None) -> "_ExportJob":
        """Check the output path, load the source, and decide the input convention before converting."""
        out_path = Path(out) if out is not None else default_output(model_path, settings.mode)
        if out_path.suffix != ".tflite":
            raise ConversionError(f"output must end in .tflite, got {out_path}")
        artifacts.check_writable(out_path, force=force)
        original = source or load_source(model_path, trust_code=settings.trust_model_code)
        settings, note = resolved(original, settings)
        converted = converted_source(original, settings.decided_convention)
        representative = representative_in(representative, settings.decided_convention)
        if representative is not None and settings.mode in CALIBRATED_MODES:
            if representative.spec.size != original.input_size:
                raise CalibrationError(f"calibration images are preprocessed to {representative.spec.size}px but "
                                       f"the model takes {original.input_size}px")
        return cls(model_path, out_path, artifacts.manifest_path_for(out_path), converted, original, settings, note,
                   representative)

    @property
    def uses_calibration(self) -> bool:
        return self.settings.mode in CALIBRATED_MODES and self.representative is not None


def _convert_for(job: _ExportJob, progress: Progress | None) -> tuple[bytes, dict]:
    """The converted bytes and the calibration record (what calibrated them, for the manifest)."""
    record: dict = {}
    model_bytes = convert_bytes(job.source, job.settings, job.representative if job.uses_calibration else None,
                                progress, record)
    return model_bytes, record


def _optimized(job: _ExportJob, model_bytes: bytes, optimize) -> tuple[bytes, list[dict]]:
    """The graph rewrites on a calibrated model (``optimize_graph``, or the accuracy search's own)."""
    if not (job.settings.optimize and job.settings.mode in CALIBRATED_MODES):
        return model_bytes, []
    if optimize is None:
        return optimize_graph(model_bytes, job.source, job.representative)
    return optimize(model_bytes)


def _spec_and_labels(job: _ExportJob) -> tuple[PreprocessSpec, list[str] | None]:
    """The preprocessing the model takes (checked against a .tflite source's own) and its class names."""
    representative, settings = job.representative, job.settings
    spec = representative.spec if representative is not None else PreprocessSpec(
        size=job.source.input_size, input_convention=settings.decided_convention)
    earlier = source_manifest(job.model_path) if job.source.kind == "tflite" else {}
    recorded = (earlier.get("preprocessing") or {}).get("fingerprint")
    source_convention = recorded_convention(earlier.get("preprocessing"))
    if recorded and recorded != replace(spec, input_convention=source_convention).fingerprint:
        raise CalibrationError(f"{job.model_path.name} was converted for preprocessing {recorded}, but the "
                               f"calibration images are preprocessed as {spec.fingerprint}; the int8 ranges would "
                               "not match what the model sees")
    return spec, _labels_beside(job.model_path) or earlier.get("labels")


def _manifest(job: _ExportJob, model_bytes: bytes, info, spec: PreprocessSpec, labels, calibration_record: dict,
              optimizations: list[dict]) -> dict:
    """What the manifest says about the written bytes (the timing is added last)."""
    settings, source, model_path = job.settings, job.source, job.model_path
    manifest = artifacts.base_manifest("tflite")
    manifest.update({
        "settings": {**settings.to_dict(), "qat_source": is_qat_model(source),
                     "converter": "tf.lite.TFLiteConverter", "batch_size": 1},
        "source": {"path": str(model_path), "kind": source.kind, "sha256": artifacts.sha256_any(model_path),
                   "bytes": artifacts.size_any(model_path), "input_shape": list(source.input_shape),
                   "classes": source.classes, "inlined_models": job.original.cache.get("inlined_models", [])},
        "output": {"path": job.out_path.name, "sha256": artifacts.sha256_bytes(model_bytes),
                   "bytes": len(model_bytes)},
        "preprocessing": spec.describe(),
        "input_convention": convention_record(settings.decided_convention, job.convention_note,
                                              stem_record(source, job.representative)),
        "calibration": ({**job.representative.to_manifest(), "method": calibration_record}
                        if job.uses_calibration and job.representative is not None else None),
        "io": {"inputs": info.inputs, "outputs": info.outputs},
        "optimizations": optimizations,
        "xnnpack": xnnpack_report(model_bytes),
        "ops": {"histogram": info.op_histogram, "weight_dtypes": info.weight_dtypes,
                "int_ops": info.int_op_count, "float_ops": info.float_op_count,
                "left_float": info.float_ops, "operators": info.operator_count},
    })
    if labels is not None:
        manifest["labels"] = labels
    return manifest


CHECK_SAMPLES = 32


def float_outputs(source: SourceModel, inputs: np.ndarray) -> np.ndarray:
    """The float source model's outputs (probabilities) for a batch of preprocessed inputs."""
    # Small batches: a 299x299 Xception holds about 300 MB of activations per image.
    chunks = [inputs[i:i + 4] for i in range(0, len(inputs), 4)]
    if source.model is not None:
        return np.concatenate([np.asarray(source.model(c, training=False), dtype=np.float32) for c in chunks])
    if source.kind == "tflite":
        return run_batch(float_tflite(source), inputs)[0]
    import tensorflow as tf

    signature = tf.saved_model.load(str(source.path)).signatures["serving_default"]
    return np.concatenate([np.asarray(next(iter(signature(tf.constant(c)).values())), dtype=np.float32)
                           for c in chunks])


def optimize_graph(model_bytes: bytes, source: SourceModel, representative,
                   rewrites: tuple[Callable, ...] | None = None,
                   gate: Callable[[bytes, bytes], dict] | None = None) -> tuple[bytes, list[dict]]:
    """Apply the XNNPACK-friendly rewrites, keeping them only if real data shows they do no harm.

    The rewrites are checked together first (stock model against the fully
    rewritten one: one run of each on the check images); only if that check
    fails is each rewrite checked on its own, in turn, so a harmful one is
    dropped and the others kept. ``gate(stock, rewritten)``, when given, is a
    further condition on a rewrite the check accepted (the accuracy search's:
    no top-1 change on its eval images); it returns a dict with ``accepted``,
    recorded as the check's ``gate``. ``source`` and ``representative`` are
    in the model's input convention (the folded source and pixels, for a
    pixel-input model).
    """
    staged, current = _staged_rewrites(model_bytes, rewrites or (fuse_shared_add_relu, raise_negligible_add_inputs))
    if not staged:
        return model_bytes, []
    entries = [entry for _, entry in staged]
    if representative is None or not len(representative):
        for entry in entries:  # a QAT model converted without images: nothing real to check on, keep the stock graph
            entry["applied"] = False
            entry["check"] = {"skipped": "no calibration images to check the rewrite on"}
        return model_bytes, entries
    check = _rewrite_check(source, representative, gate)
    together = check(model_bytes, current)
    if together["accepted"]:
        names = [entry["name"] for entry in entries]
        for entry in entries:
            entry["check"] = {**together, "together_with": names}
            entry["applied"] = True
        return current, entries
    return _each_checked(model_bytes, staged, check), entries


def _staged_rewrites(model_bytes: bytes, rewrites) -> tuple[list[tuple[Callable, dict]], bytes]:
    """(rewrite, manifest entry) for each rewrite that found work, applied in turn, and the fully rewritten bytes."""
    staged: list[tuple[Callable, dict]] = []
    current = model_bytes
    for rewrite in rewrites:
        candidate, report = rewrite(current)
        if not report.count:
            continue
        entry = report.to_dict()
        entry["delegate_partitions"] = {"before": delegate_partitions(current),
                                        "after": delegate_partitions(candidate)}
        staged.append((rewrite, entry))
        current = candidate
    return staged, current


def _rewrite_check(source: SourceModel, representative, gate) -> Callable[[bytes, bytes], dict]:
    """check(stock, rewritten) on the first calibration images, the float reference computed only if needed."""
    n = min(CHECK_SAMPLES, len(representative))
    inputs = np.stack([representative.inputs(i) for i in range(n)])
    outputs_cache: dict = {}
    reference_cache: list = []

    def reference():
        if not reference_cache:
            reference_cache.append(float_outputs(source, inputs))
        return reference_cache[0]

    def check(stock: bytes, rewritten: bytes) -> dict:
        result = check_rewrite(stock, rewritten, inputs, reference, outputs_cache)
        if result["accepted"] and gate is not None:
            result["gate"] = gate(stock, rewritten)
            result["accepted"] = bool(result["gate"]["accepted"])
        return result

    return check


def _each_checked(model_bytes: bytes, staged, check) -> bytes:
    """Each rewrite redone on what was kept so far, and kept only if its own check passes."""
    current = model_bytes
    for rewrite, entry in staged:
        candidate, _ = rewrite(current)
        entry["delegate_partitions"] = {"before": delegate_partitions(current),
                                        "after": delegate_partitions(candidate)}
        entry["check"] = check(current, candidate)
        entry["applied"] = entry["check"]["accepted"]
        if entry["applied"]:
            current = candidate
    return current


def _model_info(source: SourceModel, settings: ConvertSettings, spec: PreprocessSpec, labels) -> ModelInfo:
    """The standard metadata's fields; the same for a Keras model and the float .tflite converted from it."""
    earlier = read_metadata(float_tflite(source)) if source.kind == "tflite" else None
    name = (earlier.name.decode() if earlier is not None and earlier.name else
            getattr(source.model, "name", None) or source.path.stem)
    mean, std = spec.normalization
    return ModelInfo(name=name, version=artifacts.versions()["xception-edge"] or "unknown",
                     description=f"{settings.mode} image classifier, {source.classes} classes, "
                                 f"{source.input_size}x{source.input_size} RGB input; converted by xception-edge",
                     labels=labels, mean=(mean,), std=(std,))


def _labels_beside(model_path: Path) -> list[str] | None:
    """Class names from a training run's labels.json, so the .tflite manifest carries them."""

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

"""What a converted model's manifest and its standard metadata say about it.

The manifest (``pipeline.core.artifacts``) records the settings, the source,
the output, the preprocessing, the input convention, what calibrated the
model, the rewrites, XNNPACK's view and the ops; the metadata inside the
model carries its name, normalization and labels for standard clients.
Everything here describes bytes already made; nothing converts.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from pipeline.conversion.convention_choice import convention_record, is_qat_model, source_manifest, stem_record
from pipeline.conversion.routes import CalibrationRecord, float_tflite
from pipeline.conversion.settings import ConvertSettings, Representative
from pipeline.core import artifacts
from pipeline.core.errors import CalibrationError
from pipeline.core.preprocessing import PreprocessSpec, recorded_convention
from pipeline.core.stage_timing import timed
from pipeline.model.modelio import SourceModel
from pipeline.model.run_labels import labels_beside
from pipeline.tflite.metadata import ModelInfo, read_metadata
from pipeline.tflite.rewrites import xnnpack_report


class Described(Protocol):
    """The export a manifest describes (``pipeline.conversion.export``'s job): where it came from and went,
    the source as converted and as loaded, the settings with their input convention decided, and the
    calibration set in that convention."""

    model_path: Path
    out_path: Path
    source: SourceModel
    original: SourceModel
    settings: ConvertSettings
    convention_note: str
    representative: Representative | None

    @property
    def uses_calibration(self) -> bool: ...


def spec_and_labels(job: Described) -> tuple[PreprocessSpec, list[str] | None]:
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
    return spec, labels_beside(job.model_path) or earlier.get("labels")


def manifest_for(job: Described, model_bytes: bytes, info, spec: PreprocessSpec, labels: list[str] | None,
                 calibration: CalibrationRecord, optimizations: list[dict]) -> dict[str, Any]:
    """What the manifest says about the written bytes (the timing is added last)."""
    settings, source, model_path = job.settings, job.source, job.model_path
    with timed("probe"):  # the folded stem's effect, measured on the calibration images
        stem = stem_record(source, job.representative)
    manifest = artifacts.base_manifest("tflite")
    manifest.update({
        "settings": {**settings.to_dict(), "qat_source": is_qat_model(source),
                     "converter": "tf.lite.TFLiteConverter", "batch_size": 1},
        "source": {"path": str(model_path), "kind": source.kind, "sha256": artifacts.sha256_any(model_path),
                   "bytes": artifacts.size_any(model_path), "input_shape": list(source.input_shape),
                   "classes": source.classes, "inlined_models": job.original.cache.inlined_models},
        "output": {"path": job.out_path.name, "sha256": artifacts.sha256_bytes(model_bytes),
                   "bytes": len(model_bytes)},
        "preprocessing": spec.describe(),
        "input_convention": convention_record(settings.decided_convention, job.convention_note, stem),
        "calibration": ({**job.representative.to_manifest(), "method": calibration.to_manifest()}
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


def model_info(source: SourceModel, settings: ConvertSettings, spec: PreprocessSpec, labels) -> ModelInfo:
    """The standard metadata's fields; the same for a Keras model and the float .tflite converted from it."""
    earlier = read_metadata(float_tflite(source)) if source.kind == "tflite" else None
    name = (earlier.name.decode() if earlier is not None and earlier.name else
            getattr(source.model, "name", None) or source.path.stem)
    mean, std = spec.normalization
    return ModelInfo(name=name, version=artifacts.versions()["xception-edge"] or "unknown",
                     description=f"{settings.mode} image classifier, {source.classes} classes, "
                                 f"{source.input_size}x{source.input_size} RGB input; converted by xception-edge",
                     labels=labels, mean=(mean,), std=(std,))

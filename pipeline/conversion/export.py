"""Float model -> .tflite in one of five modes, with a manifest that tells the story.

One export: load the source and decide its input convention, convert it
(``routes``), keep the graph rewrites that do no harm (``rewrite_gate``),
check the ops and the input, add the metadata and the manifest
(``conversion_manifest``), and write the pair atomically. The manifest's
``timing`` says how long each stage took (``pipeline.core.stage_timing``).

The representative dataset is an argument (anything with ``batches()``,
``to_manifest()`` and ``spec``): this module never finds or decodes images
itself, so the calibration data cannot drift from the one preprocessing
definition behind the caller's back. The names callers import from here (the
routes, the rewrite gate, the float reference, the settings) are re-exported
from their modules (``__all__``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.conversion.conversion_manifest import manifest_for, model_info, spec_and_labels
from pipeline.conversion.convention_choice import (
    check_input_convention,
    converted_source,
    is_qat_model,
    representative_in,
    resolved,
)
from pipeline.conversion.float_reference import float_outputs
from pipeline.conversion.rewrite_gate import optimize_graph
from pipeline.conversion.routes import (
    CalibrationRecord,
    Conversion,
    convert_bytes,
    convert_model,
    convert_spliced,
    donor_model,
    float_tflite,
    int8_float_model,
    methods_decided,
    paired_float_model,
)
from pipeline.conversion.settings import CALIBRATED_MODES, ConvertSettings, Progress, Representative, default_output
from pipeline.core import artifacts
from pipeline.core.errors import CalibrationError, ConversionError, Remedy
from pipeline.core.stage_timing import measuring, running, timed
from pipeline.model.modelio import SourceModel, load_source
from pipeline.tflite.contents import inspect_tflite
from pipeline.tflite.metadata import add_metadata

__all__ = [
    "CALIBRATED_MODES", "CalibrationRecord", "Conversion", "ConvertSettings", "ExportResult", "Progress",
    "Representative", "check_integer_ops", "convert_bytes", "convert_model", "convert_spliced", "default_output",
    "donor_model", "export_tflite", "float_outputs", "float_tflite", "int8_float_model", "is_qat_model",
    "optimize_graph", "paired_float_model",
]


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


def check_integer_ops(info, settings: ConvertSettings) -> None:
    if settings.mode != "int8" or settings.allow_float_fallback or not info.heavy_float_ops:
        return
    names = ", ".join(f"{e['op']} ({e['output']})" for e in info.heavy_float_ops[:4])
    more = f" and {len(info.heavy_float_ops) - 4} more" if len(info.heavy_float_ops) > 4 else ""
    raise ConversionError(f"{len(info.heavy_float_ops)} compute ops stayed float in int8 mode: {names}{more}",
                          remedy=Remedy.ALLOW_FLOAT_FALLBACK)


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
    nested = running()
    with measuring() as clock:
        if source is not None and not nested and source.cache.load_s is not None:  # loaded by the caller
            clock.book_before("load", source.cache.load_s)
            source.cache.load_s = None
        with timed("load"):
            job = _ExportJob.prepare(Path(model_path), settings, out, representative, force, source)
        with timed("convert"):  # the routes book their probe, calibration and quantizer stages themselves
            conversion = _convert_for(job, progress)
        with timed("rewrites"):
            model_bytes, optimizations = _optimized(job, conversion.model, optimize)
        with timed("metadata"):
            info = inspect_tflite(model_bytes)
            check_integer_ops(info, job.settings)
            with timed("probe"):
                check_input_convention(model_bytes, job.settings)
            spec, labels = spec_and_labels(job)
            model_bytes = add_metadata(model_bytes, model_info(job.source, job.settings, spec, labels))
            manifest = manifest_for(job, model_bytes, info, spec, labels, conversion.calibration, optimizations)
        if annotate is not None:
            with timed("search"):
                manifest.update(annotate(model_bytes))
        with timed("write"):
            artifacts.check_writable(job.out_path, force=force)  # it may have appeared while we worked
            # manifest, then model; the timing is taken once the model is staged, as the manifest is serialized
            artifacts.atomic_write_pair(job.out_path, model_bytes, job.manifest_path, manifest,
                                        staged_hook=lambda written: written.update(timing=clock.to_manifest()))
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
        with timed("probe"):
            settings, note = resolved(original, settings)
            converted = converted_source(original, settings.decided_convention)
            representative = representative_in(representative, settings.decided_convention)
            settings = methods_decided(settings, converted, representative)
        if representative is not None and settings.mode in CALIBRATED_MODES:
            if representative.spec.size != original.input_size:
                raise CalibrationError(f"calibration images are preprocessed to {representative.spec.size}px but "
                                       f"the model takes {original.input_size}px")
        return cls(model_path, out_path, artifacts.manifest_path_for(out_path), converted, original, settings, note,
                   representative)

    @property
    def uses_calibration(self) -> bool:
        return self.settings.mode in CALIBRATED_MODES and self.representative is not None


def _convert_for(job: _ExportJob, progress: Progress | None) -> Conversion:
    """The converted bytes and the calibration record (what calibrated them, for the manifest)."""
    return convert_model(job.source, job.settings, job.representative if job.uses_calibration else None, progress)


def _optimized(job: _ExportJob, model_bytes: bytes, optimize) -> tuple[bytes, list[dict]]:
    """The graph rewrites on a calibrated model (``optimize_graph``, or the accuracy search's own)."""
    if not (job.settings.optimize and job.settings.mode in CALIBRATED_MODES):
        return model_bytes, []
    if optimize is None:
        return optimize_graph(model_bytes, job.source, job.representative)
    return optimize(model_bytes)

"""The XNNPACK-friendly graph rewrites, kept only where real data shows they do no harm.

The rewrites themselves work on the .tflite alone (``pipeline.tflite.rewrites``);
deciding whether to keep them needs the calibration images and the float
source model's outputs, which is why the gate lives in the conversion stage.
Each rewrite's ``RewriteRecord`` is what the manifest's ``optimizations`` lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pipeline.conversion.float_reference import float_outputs
from pipeline.core.stage_timing import timed
from pipeline.model.modelio import SourceModel
from pipeline.tflite.rewrites import (
    check_rewrite,
    delegate_partitions,
    fuse_shared_add_relu,
    raise_negligible_add_inputs,
)

CHECK_SAMPLES = 32

Check = Callable[[bytes, bytes], dict]


@dataclass
class RewriteRecord:
    """One rewrite that found work: what it changed, the XNNPACK partitions before and after, its check
    (``check_rewrite``'s figures, with the further gate's when one was given) and whether it was kept."""

    report: dict[str, Any]  # the rewrite's own report: name, count, what it rewrote
    delegate_partitions: dict[str, Any]
    rewrite: Callable = field(repr=False, compare=False)  # to redo it alone on what was kept
    check: dict[str, Any] | None = None
    applied: bool = False

    @property
    def name(self) -> str:
        return str(self.report["name"])

    def to_manifest(self) -> dict[str, Any]:
        return {**self.report, "delegate_partitions": self.delegate_partitions, "check": self.check,
                "applied": self.applied}


def optimize_graph(model_bytes: bytes, source: SourceModel, representative,
                   rewrites: tuple[Callable, ...] | None = None,
                   gate: Callable[[bytes, bytes], dict] | None = None) -> tuple[bytes, list[dict]]:
    """``gate_rewrites``, with its records as the manifest's ``optimizations`` entries."""
    model, records = gate_rewrites(model_bytes, source, representative, rewrites, gate)
    return model, [record.to_manifest() for record in records]


def gate_rewrites(model_bytes: bytes, source: SourceModel, representative,
                  rewrites: tuple[Callable, ...] | None = None,
                  gate: Callable[[bytes, bytes], dict] | None = None) -> tuple[bytes, list[RewriteRecord]]:
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
    with timed("rewrites"):
        staged, current = _staged_rewrites(model_bytes,
                                           rewrites or (fuse_shared_add_relu, raise_negligible_add_inputs))
        if not staged:
            return model_bytes, []
        if representative is None or not len(representative):
            for record in staged:  # a QAT model converted without images: nothing real to check on, keep the stock
                record.check = {"skipped": "no calibration images to check the rewrite on"}
            return model_bytes, staged
        check = _rewrite_check(source, representative, gate)
        together = check(model_bytes, current)
        if together["accepted"]:
            names = [record.name for record in staged]
            for record in staged:
                record.check = {**together, "together_with": names}
                record.applied = True
            return current, staged
        return _each_checked(model_bytes, staged, check), staged


def _staged_rewrites(model_bytes: bytes, rewrites) -> tuple[list[RewriteRecord], bytes]:
    """A record for each rewrite that found work, applied in turn, and the fully rewritten bytes."""
    staged: list[RewriteRecord] = []
    current = model_bytes
    for rewrite in rewrites:
        candidate, report = rewrite(current)
        if not report.count:
            continue
        partitions = {"before": delegate_partitions(current), "after": delegate_partitions(candidate)}
        staged.append(RewriteRecord(report.to_dict(), partitions, rewrite))
        current = candidate
    return staged, current


def _rewrite_check(source: SourceModel, representative, gate) -> Check:
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


def _each_checked(model_bytes: bytes, staged: list[RewriteRecord], check: Check) -> bytes:
    """Each rewrite redone on what was kept so far, and kept only if its own check passes."""
    current = model_bytes
    for record in staged:
        candidate, _ = record.rewrite(current)
        record.delegate_partitions = {"before": delegate_partitions(current), "after": delegate_partitions(candidate)}
        record.check = check(current, candidate)
        record.applied = bool(record.check["accepted"])
        if record.applied:
            current = candidate
    return current

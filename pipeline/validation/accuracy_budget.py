"""Convert to int8 (or int16x8) within a top-1 drop budget, keeping the most harmful layers in float (or int16).

TFLite has the means (per-layer error, ``denylisted_nodes``) but no loop that
guarantees a budget; OpenVINO NNCF's ``quantize_with_accuracy_control`` is the
model for this one: measure, rank, revert the worst layer to float, measure
again. Ranking alone is not trusted: per-layer error is accumulated through
the network, so the few layers where it *jumps* are candidates, and each
candidate is measured on the eval images (keep it float, re-quantize, measure
the drop); the best one is kept. Steps are recorded in the manifest.

How a layer is kept out is ``pipeline.conversion.float_fallback.method_for``'s choice:
int8 to float re-quantizes with the MLIR quantizer's denylist; int16x8 to
float, and int8 to int16 (``fallback="int16"``), splice the layer's ops from
a second conversion of the source (``pipeline.tflite.splice``): the quantized
model and the donor are each converted once for the search, and every
candidate is a splice of the two.

The pieces live beside this entry point: ``drop_meter`` (the eval images,
decoded once, and the held-out split), ``layer_ranking`` (which layers to
try), ``budget_search`` (the search and the write) and ``budget_settings``
(the request, checked when made).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.conversion.export import ConvertSettings, ExportResult, default_output
from pipeline.conversion.settings import ConvertRequest
from pipeline.core import artifacts
from pipeline.core.stage_timing import measured_as
from pipeline.validation.budget_search import BudgetSearch, Say
from pipeline.validation.budget_settings import BudgetSettings, LatencyCheck
from pipeline.validation.drop_meter import HOLDOUT_MIN_PER_CLASS, DropMeter, holdout_split
from pipeline.validation.layer_ranking import rank_layers


@dataclass
class BudgetResult:
    export: ExportResult
    float_layers: list[str]
    steps: list[dict]
    final: dict
    latency: dict | None = None
    budget_pp: float = 0.0
    heldout: dict | None = None  # figures on the held-out eval images, when there are any

    @property
    def record(self) -> dict:
        return self.export.manifest["float_fallback"]


@measured_as("search")  # the written manifest's timing covers the whole search
def convert_within_budget(model_path, settings: ConvertSettings, budget: BudgetSettings, *, representative,
                          out=None, force: bool = False, source=None, say: Say = lambda s: None,
                          progress=None) -> BudgetResult:
    """Convert ``model_path`` so its top-1 drop on ``budget.eval_dir`` is at most ``budget.max_drop_pp``.

    Every candidate is measured as it will be written, graph rewrites
    included; a rewrite that changes a top-1 prediction on the eval images is
    left out (``optimize_graph``'s gate). A third of the eval images is held
    out of the search (``holdout_split``) and the chosen model must meet the
    budget on it too. Every candidate has the input convention the written
    model gets (decided once, ``pipeline.conversion.convention_choice``).

    Raises ``BudgetNotReached`` (exit 3) when ``max_float_layers`` float layers
    are not enough, or the held-out images miss the budget; the best model
    found is then written beside the output as ``<name>_over_budget.tflite``
    with its manifest, for inspection, and nothing at the output.
    """
    ConvertRequest(settings, max_drop_pp=budget.max_drop_pp, eval_dir=budget.eval_dir, labels=budget.labels,
                   max_float_layers=budget.max_float_layers)  # the rules between settings and budget, checked once
    model_path = Path(model_path)
    out_path = Path(out) if out is not None else default_output(model_path, settings.mode)
    artifacts.check_writable(out_path, force=force)
    search = BudgetSearch(model_path, settings, representative, source, progress, say)
    search.meter = DropMeter(model_path, budget.eval_dir, labels=budget.labels, limit=budget.eval_limit,
                             trust_code=settings.trust_model_code, holdout=budget.holdout,
                             convention=search.settings.decided_convention)
    meter = search.meter
    say(f"measuring on {len(meter.inputs)} eval images (float top-1 {meter.top1_float:.4f}), "
        + (f"{meter.heldout_images} more held out to judge the result; " if meter.heldout_images
           else f"{meter.holdout_note}; ") + f"budget {budget.max_drop_pp:g} pp")
    found = search.run(budget)
    latency_figures = None
    if budget.latency and found.best.layers:  # bench what would be written: both with the graph rewrites kept
        latency_figures = _latency(budget.latency, found.baseline.written, found.best.written)
    record = {**budget.to_manifest(), "steps": found.steps, "latency": latency_figures}
    exported = search.finish(found.best, out_path, record, force)
    written = exported.manifest["float_fallback"]
    return BudgetResult(exported, list(found.best.layers), found.steps, written["final"], latency_figures,
                        budget.max_drop_pp, written["heldout"])


def _latency(check: LatencyCheck, before: bytes, after: bytes) -> dict:
    """The fallback's latency cost, measured on the two models (written to a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="xedge-fallback-") as tmp:
        a, b = Path(tmp) / "all_quantized.tflite", Path(tmp) / "with_fallback.tflite"
        a.write_bytes(before)
        b.write_bytes(after)
        return check(a, b)


__all__ = ["HOLDOUT_MIN_PER_CLASS", "BudgetResult", "BudgetSettings", "DropMeter", "LatencyCheck",
           "convert_within_budget", "holdout_split", "rank_layers"]

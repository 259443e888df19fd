"""The accuracy-budget search: measure, rank, keep the worst layer out of the quantized model, measure again.

Each candidate is measured as it will be written: after the graph rewrites,
and a rewrite that changes any top-1 prediction on the eval images is left
out (said, and recorded), since the rewrite check's 32 calibration images
cannot see every such change. The figure the budget is judged on is the
held-out images' (``pipeline.validation.drop_meter``) where there are any.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from pipeline.conversion.convention_choice import converted_source, representative_in, resolved
from pipeline.conversion.export import (
    ConvertSettings,
    ExportResult,
    convert_bytes,
    donor_model,
    export_tflite,
    optimize_graph,
    paired_float_model,
)
from pipeline.conversion.float_fallback import method_for
from pipeline.core import artifacts
from pipeline.core.errors import BudgetNotReached, ConversionError
from pipeline.model.modelio import load_source
from pipeline.tflite.splice import splice
from pipeline.validation.budget_settings import BudgetSettings
from pipeline.validation.drop_meter import HOLDOUT_MIN_PER_CLASS, DropFigures, DropMeter
from pipeline.validation.layer_ranking import rank_layers

Say = Callable[[str], None]


@dataclass
class SearchState:
    """One candidate: the layers it keeps out, its bytes before and after the rewrites, and its figures."""

    layers: list[str]
    model: bytes = field(repr=False)  # the quantizer's output (what a splice starts from)
    written: bytes = field(repr=False)  # the model as it is written: after the graph rewrites kept
    optimizations: list[dict]
    figures: DropFigures  # measured on ``written``, on the search images

    @property
    def drop_pp(self) -> float:
        return self.figures.top1_drop_pp

    def applied(self) -> list[str]:
        return [e["name"] for e in self.optimizations if e.get("applied")]


class Judgement(NamedTuple):
    """Figures of one model: on the search images, on the held-out ones, and the one the budget is gated on."""

    search: DropFigures
    heldout: DropFigures | None
    gate_on: str  # "heldout" where there are held-out images, else "search"
    gate_pp: float


@dataclass
class SearchOutcome:
    """What the search found: the best state, the all-quantized baseline, and the steps taken (manifest rows)."""

    best: SearchState
    baseline: SearchState
    steps: list[dict]


class WrittenOverBudget(Exception):
    """Raised by the manifest hook before anything is written: the bytes about to be written miss the budget."""


class BudgetSearch:
    """The search's state: the source in the written model's input convention, its calibration set, the
    meter, and the conversions and rewrites already done (each candidate is converted and rewritten once)."""

    meter: DropMeter

    def __init__(self, model_path: Path, settings: ConvertSettings, representative, source, progress, say: Say):
        self.t0 = time.perf_counter()
        self.model_path, self.progress, self.say = model_path, progress, say
        self.asked = settings.input_convention  # the written model's manifest says why, as a plain export would
        self.original = source or load_source(model_path, trust_code=settings.trust_model_code)
        # The gate on float compute ops is what this search relaxes on purpose.
        settings = replace(settings, allow_float_fallback=True, float_layers=())
        self.settings, _ = resolved(self.original, settings)  # one input convention for every candidate
        self.source = converted_source(self.original, self.settings.decided_convention)  # folded once for pixels
        self.representative = representative_in(representative, self.settings.decided_convention)
        self.method, self.kept_in = method_for(self.settings), self.settings.fallback
        self.converted: dict[str, bytes] = {}
        self.prepared: dict[str, tuple[bytes, list[dict]]] = {}
        self.baseline: SearchState | None = None

    def donor(self) -> bytes:
        if "donor" not in self.converted:
            self.converted["donor"] = donor_model(self.source, self.settings, self.representative)
        return self.converted["donor"]

    def eval_gate(self, stock: bytes, rewritten: bytes) -> dict:
        """A rewrite may not change any top-1 prediction on the eval images (all of them: no labels are used)."""
        changed = int(np.sum(self.meter.top1(stock) != self.meter.top1(rewritten)))
        return {"eval_images": len(self.meter.all_inputs), "eval_top1_changed": changed, "accepted": changed == 0}

    def prepare(self, model: bytes) -> tuple[bytes, list[dict]]:
        """The model as ``export_tflite`` writes it: the graph rewrites that pass both checks applied."""
        if not self.settings.optimize:
            return model, []
        key = artifacts.sha256_bytes(model)
        if key not in self.prepared:
            self.prepared[key] = optimize_graph(model, self.source, self.representative, gate=self.eval_gate)
        return self.prepared[key]

    def quantize_with(self, layers: list[str]) -> SearchState:
        if layers and self.method == "splice":
            if self.baseline is None:
                raise ConversionError("splicing float layers needs the all-quantized baseline first (run)")
            model = splice(self.baseline.model, self.donor(), layers)
        else:
            model = convert_bytes(self.source, replace(self.settings, float_layers=tuple(layers)),
                                  self.representative, self.progress)
        written, optimizations = self.prepare(model)
        return SearchState(list(layers), model, written, optimizations, self.meter.measure(written))

    def run(self, budget: BudgetSettings) -> SearchOutcome:
        """Add the layer whose float copy lowers the drop most, until the drop is within budget or
        ``max_float_layers`` are kept out."""
        state = self.quantize_with([])
        steps = [{"float_layers": [], "top1_drop_pp": state.drop_pp, "top1": state.figures.top1_quant,
                  "rewrites": state.applied()}]
        self.say(f"step 0: all layers quantized: drop {state.drop_pp:.2f} pp")
        self.baseline, best = state, state
        while state.drop_pp > budget.max_drop_pp and len(state.layers) < budget.max_float_layers:
            step = self.step(state, budget.candidates, budget.layer_samples)
            if step is None:
                break
            state, entry = step
            steps.append(entry)
            if state.drop_pp < best.drop_pp:
                best = state
        if state.drop_pp <= budget.max_drop_pp:
            best = state  # the search stops at the first state within budget: the fewest float layers
        for entry in best.optimizations:
            gate = (entry.get("check") or {}).get("gate")
            if gate and not gate["accepted"]:
                self.say(f"graph rewrite {entry['name']} left out: it changes the top-1 prediction on "
                         f"{gate['eval_top1_changed']} of {gate['eval_images']} eval images (recorded in the manifest)")
        return SearchOutcome(best, self.baseline, steps)

    def step(self, state: SearchState, candidates: int, layer_samples: int) -> tuple[SearchState, dict] | None:
        """One step: rank the layers by added error, measure the top ``candidates`` kept out, keep the best."""
        # the float model the candidates' layers pair with by name (converted once per source, shared with the stages)
        float_bytes = paired_float_model(self.source, self.settings, self.representative)
        ranked = rank_layers(float_bytes, state.written, self.meter.inputs_for(state.written)[:layer_samples],
                             exclude=set(state.layers))
        trials = [(self.quantize_with(state.layers + [entry["layer"]]), entry) for entry in ranked[:candidates]]
        if not trials:
            return None
        trial, entry = min(trials, key=lambda t: t[0].drop_pp)  # stable: ties keep the rank order
        record = {"float_layers": list(trial.layers), "added": entry["layer"],
                  "top1_drop_pp": trial.drop_pp, "top1": trial.figures.top1_quant,
                  "rewrites": trial.applied(), "ranked": ranked[:candidates],
                  "tried": [{"layer": e["layer"], "top1_drop_pp": t.drop_pp} for t, e in trials]}
        tried = ", ".join(e["layer"] for _, e in trials)
        self.say(f"step {len(trial.layers)}: {entry['layer']} kept in {self.kept_in} (tried {tried}): "
                 f"drop {trial.drop_pp:.2f} pp")
        return trial, record

    def judge(self, model_bytes: bytes) -> Judgement:
        """Search and held-out figures of these bytes, and the figure the budget is gated on."""
        search = self.meter.measure(model_bytes)
        held = self.meter.measure(model_bytes, "heldout") if self.meter.heldout_images else None
        return Judgement(search, held, "heldout" if held else "search", (held or search).top1_drop_pp)

    def fallback_record(self, model_bytes: bytes, best: SearchState, record: dict, reached: bool) -> dict:
        """The manifest's ``float_fallback``, measured on the bytes on disk (after the graph rewrites)."""
        judged = self.judge(model_bytes)
        meter, held = self.meter, judged.heldout
        return {
            **record, "reached": reached, "method": self.method, "kept_in": self.kept_in,
            "layers": list(best.layers), "final_top1_drop_pp": judged.search.top1_drop_pp,
            "final": judged.search.to_manifest(), "heldout": held.to_manifest() if held else None,
            "heldout_top1_drop_pp": held.top1_drop_pp if held else None,
            "heldout_top1_drop_ci95_pp": list(held.top1_drop_ci95_pp) if held else None,
            "gate": {"on": judged.gate_on, "top1_drop_pp": judged.gate_pp, "reason": meter.holdout_note},
            "eval": {**record["eval"], "images": len(meter.all_inputs), "search_images": len(meter.inputs),
                     "heldout_images": meter.heldout_images, "holdout_min_per_class": HOLDOUT_MIN_PER_CLASS,
                     "holdout": meter.holdout_note, "labels": meter.labels_source, "top1_float": meter.top1_float},
            "search_s": round(time.perf_counter() - self.t0, 3)}

    def write(self, target: Path, best: SearchState, record: dict, reached: bool, force: bool) -> ExportResult:
        max_drop_pp = record["budget_top1_drop_pp"]

        def annotate(model_bytes: bytes) -> dict:
            if reached and self.judge(model_bytes).gate_pp > max_drop_pp:  # checked before anything is written
                raise WrittenOverBudget
            return {"float_fallback": self.fallback_record(model_bytes, best, record, reached)}

        settings = replace(self.settings, float_layers=tuple(best.layers), input_convention=self.asked)
        return export_tflite(self.model_path, settings, out=target, representative=self.representative,
                             force=force or not reached, source=self.original, annotate=annotate,
                             optimize=self.prepare)

    def finish(self, best: SearchState, out_path: Path, record: dict, force: bool) -> ExportResult:
        """Write the chosen model (or, over budget, the best one beside the output and raise why)."""
        max_drop_pp = record["budget_top1_drop_pp"]
        judged = self.judge(best.written)
        searched = best.drop_pp <= max_drop_pp
        reached = searched and judged.gate_pp <= max_drop_pp
        over_path = out_path.with_name(f"{out_path.stem}_over_budget.tflite")
        try:
            exported = self.write(out_path if reached else over_path, best, record, reached, force)
        except WrittenOverBudget:  # the conversion for the output differed from the one measured
            exported = self.write(over_path, best, record, False, force)
            written = exported.manifest["float_fallback"]["gate"]["top1_drop_pp"]
            raise BudgetNotReached(f"the written model's top-1 drop is {written:.2f} pp (the search measured "
                                   f"{judged.gate_pp:.2f} pp on the same images); it is kept as {exported.path} for "
                                   "inspection") from None
        if not reached:
            raise BudgetNotReached(self.over_budget(best, judged, max_drop_pp, searched, exported,
                                                    record["max_float_layers"]),
                                   setting=None if searched else "max_float_layers")
        return exported

    def over_budget(self, best: SearchState, judged: Judgement, max_drop_pp: float, searched: bool,
                    exported: ExportResult, max_float_layers: int) -> str:
        """Why the budget was not reached: the search itself, or the held-out images."""
        layers = ", ".join(best.layers) or "none"
        if not searched:
            return (f"top-1 drop {best.drop_pp:.2f} pp is over the {max_drop_pp:g} pp budget even "
                    f"with {len(best.layers)} layers in {self.kept_in} ({layers}; at most {max_float_layers} "
                    f"allowed); the best model is kept as {exported.path} for inspection")
        lo, hi = (judged.heldout or judged.search).top1_drop_ci95_pp  # searched within budget: held-out missed
        return (f"on the {self.meter.heldout_images} held-out eval images the top-1 drop is {judged.gate_pp:.2f} pp "
                f"(95% CI {lo:.2f} to {hi:.2f}), over the {max_drop_pp:g} pp budget; the search reached "
                f"{best.drop_pp:.2f} pp on its {len(self.meter.inputs)} images with "
                f"{len(best.layers)} layers in {self.kept_in} ({layers}); the model is kept as {exported.path} "
                "for inspection")


__all__ = ["BudgetSearch", "Judgement", "SearchOutcome", "SearchState", "WrittenOverBudget"]

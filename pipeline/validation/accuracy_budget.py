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

The drop is computed by the same pieces as ``xedge validate`` (discovery,
round-robin limit, preprocessing, label mapping, ``drift_metrics``), with the
eval images decoded and the float model run once for the whole search.

Two things keep the reported figure honest. Each candidate is
measured as it will be written: after the graph rewrites, and a rewrite that
changes any top-1 prediction on the eval images is left out (said, and
recorded), since the rewrite check's 32 calibration images cannot see every
such change. And a stratified third of the eval images is held out of the
search: a figure measured on the images the layers were chosen on is
optimistic, so the budget is judged on the held-out part, with its interval.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.conversion.export import (
    CALIBRATED_MODES,
    ConvertSettings,
    ExportResult,
    convert_bytes,
    default_output,
    donor_model,
    export_tflite,
    float_tflite,
    optimize_graph,
)
from pipeline.conversion.convention_choice import converted_source, representative_in, resolved
from pipeline.conversion.float_fallback import method_for
from pipeline.core import artifacts
from pipeline.core.data import discover
from pipeline.core.errors import BudgetNotReached, ConversionError, ValidationError
from pipeline.core.stage_timing import measured_as
from pipeline.core.preprocessing import LEGACY_CONVENTION, PreprocessSpec, dequantize, model_input, quantize
from pipeline.tflite.input_convention import tensor_convention
from pipeline.model.modelio import load_source
from pipeline.tflite.runtime import graph_ops, open_interpreter
from pipeline.tflite.splice import splice
from pipeline.validation.layer_error import layer_errors
from pipeline.validation.metrics import drift_metrics, topk
from pipeline.validation.output_kind import tflite_output_kind
from pipeline.validation.predict import as_probabilities, default_workers, open_runner
from pipeline.validation.validate import load_item, resolve_labels, select_round_robin

Say = Callable[[str], None]
# (all quantized, with fallback) .tflite paths -> latency figures; passed in: devices/ is not imported here
LatencyCheck = Callable[[Path, Path], dict]


HOLDOUT_MIN_PER_CLASS = 3  # a held-out third needs at least one image of every class


def holdout_split(labels: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """Search and held-out image indices: every third image of each class (its 3rd, 6th, ...) is held out.

    Stratified and deterministic (the order is the eval folder's, after
    ``--eval-limit``). When a class has fewer than ``HOLDOUT_MIN_PER_CLASS``
    images nothing is held out and the third value says why; otherwise it
    describes the split.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(labels) and counts.min() >= HOLDOUT_MIN_PER_CLASS:
        held = np.zeros(len(labels), dtype=bool)
        for c in classes:
            held[np.flatnonzero(labels == c)[2::3]] = True
        return (np.flatnonzero(~held), np.flatnonzero(held),
                "every third image of each class held out of the search (stratified)")
    if not len(labels):
        return np.arange(0), np.arange(0), "no eval images"
    short = classes[np.argmin(counts)]
    return (np.arange(len(labels)), np.arange(0),
            f"no held-out part: class {names[short]!r} has {counts.min()} eval image(s) and holding out a third "
            f"needs at least {HOLDOUT_MIN_PER_CLASS} of every class; the drop is measured on the images the "
            "search was tuned on")


class DropMeter:
    """Top-1 drop of candidate .tflite bytes against the float model, on images decoded once.

    The images are split (``holdout_split``): the search measures on the
    ``search`` part only, and the held-out part judges the model it chose.
    Outputs are kept by content, so a model measured twice runs once. The
    reference is fed the decoded pixels as its own convention says; a
    candidate as its input quantization states (``convention``, the one the
    search converts for, where it states none).
    """

    CACHED_MODELS = 16

    def __init__(self, reference, data, *, labels=None, limit: int | None = None, workers: int | None = None,
                 trust_code: bool = False, holdout: bool = True, convention: str = LEGACY_CONVENTION):
        found = discover(data, what="eval folder")
        if not found.labeled:
            raise ValidationError(f"--eval needs labeled images (one subfolder per class); {data} is flat")
        self.workers = workers or default_workers()
        runner = open_runner(reference, workers=self.workers, trust_code=trust_code)
        try:
            names, self.labels_source = resolve_labels(labels, Path(reference), Path(reference), found.classes,
                                                       runner.facts.classes)
            spec = PreprocessSpec(size=runner.facts.input_size)
            loaded = [(item, load_item(item, spec)[0]) for item in select_round_robin(found.items, limit)]
            loaded = [(item, x) for item, x in loaded if x is not None]
            if not loaded:
                raise ValidationError(f"no usable images in {data}")
            self.all_pixels = np.stack([x for _, x in loaded])
            self.all_reference = as_probabilities(runner.predict_pixels(self.all_pixels), runner.output_kind,
                                                  "reference")
        finally:
            runner.close()
        index_of = {name: i for i, name in enumerate(names)}
        self.items = [item for item, _ in loaded]  # eval images in the order of ``all_pixels``
        self.convention = convention
        self.all_inputs = model_input(self.all_pixels, convention)
        self.all_labels = np.asarray([index_of[item.class_name] for item, _ in loaded])
        self.names = names
        if holdout:
            search, held, self.holdout_note = holdout_split(self.all_labels, names)
        else:
            search, held = np.arange(len(self.all_labels)), np.arange(0)
            self.holdout_note = "no held-out part (holdout=False)"
        self.parts = {"search": search, "heldout": held, "all": np.arange(len(self.all_labels))}
        self.inputs, self.labels, self.reference = (self.all_inputs[search], self.all_labels[search],
                                                    self.all_reference[search])
        self.top1_float = float(np.mean(topk(self.reference, 1)[:, 0] == self.labels))
        self._outputs: dict[str, np.ndarray] = {}

    @property
    def heldout_images(self) -> int:
        return len(self.parts["heldout"])

    def inputs_for(self, model_bytes: bytes, part: str = "search") -> np.ndarray:
        """The eval images of ``part`` as these bytes take them (their input quantization, else ``convention``)."""
        convention = tensor_convention(model_bytes) or self.convention
        if convention == self.convention:
            return self.all_inputs[self.parts[part]]
        return model_input(self.all_pixels[self.parts[part]], convention)

    def predict(self, model_bytes: bytes, inputs: np.ndarray | None = None) -> np.ndarray:
        """Outputs of bytes this process just converted (trusted: no sandboxed first load needed)."""

        inputs = self.inputs_for(model_bytes) if inputs is None else inputs
        interpreters = [open_interpreter(model_bytes) for _ in range(self.workers)]
        inp, out = interpreters[0].get_input_details()[0], interpreters[0].get_output_details()[0]

        def run(k: int) -> list[np.ndarray]:
            it, rows = interpreters[k], []
            for x in inputs[k::self.workers]:
                it.set_tensor(inp["index"], quantize(x[None], inp["dtype"], *inp["quantization"]))
                it.invoke()
                rows.append(dequantize(it.get_tensor(out["index"])[0], *out["quantization"]))
            return rows

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            parts = list(pool.map(run, range(self.workers)))
        # Worker k ran inputs k, k + workers, ...: put the rows back in input order.
        return np.stack([parts[i % self.workers][i // self.workers] for i in range(len(inputs))])

    def outputs(self, model_bytes: bytes) -> np.ndarray:
        """Probabilities of the model on every eval image (search and held-out), kept by content."""


        key = hashlib.sha256(model_bytes).hexdigest()
        if key not in self._outputs:
            if len(self._outputs) >= self.CACHED_MODELS:
                self._outputs.pop(next(iter(self._outputs)))
            self._outputs[key] = as_probabilities(self.predict(model_bytes, self.inputs_for(model_bytes, "all")),
                                                     tflite_output_kind(model_bytes), "candidate")
        return self._outputs[key]

    def top1(self, model_bytes: bytes) -> np.ndarray:
        """Predicted class per eval image (all of them), as ``drift_metrics`` ranks them."""

        return topk(self.outputs(model_bytes), 1)[:, 0]

    def measure(self, model_bytes: bytes, part: str = "search") -> dict:
        """Drift figures on one part of the eval images: ``search`` (the default), ``heldout`` or ``all``."""

        rows = self.parts[part]
        if not len(rows):
            raise ValidationError(f"no {part} eval images: {self.holdout_note}")
        m = drift_metrics(self.all_reference[rows], self.outputs(model_bytes)[rows], self.all_labels[rows],
                          self.names)
        return {"top1_drop_pp": round(m["top1_drop_pp"], 4), "top1_float": m["top1_float"],
                "top1_quant": m["top1_quant"], "agreement": m["agreement"], "kl_mean": m["kl_mean"],
                "samples": m["samples"], "top1_drop_ci95_pp": [round(v, 4) for v in m["top1_drop_ci95_pp"]],
                "mcnemar": m["mcnemar"]}


def rank_layers(float_bytes: bytes, quant_bytes: bytes, inputs, exclude=()) -> list[dict]:
    """Layers by the error each one *adds* (its RMSE/scale minus the worst of its inputs'), worst first."""

    errors = layer_errors(float_bytes, quant_bytes, inputs)
    by_tensor = {e.tensor: e for e in errors}
    interpreter = open_interpreter(quant_bytes)  # names and op wiring only; nothing runs
    names = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    scores: dict[str, dict] = {}
    for op in graph_ops(interpreter, quant_bytes):
        upstream = [by_tensor[names[int(i)]].rmse_over_scale for i in op["inputs"]
                    if int(i) >= 0 and names.get(int(i)) in by_tensor]
        for index in op["outputs"]:
            name = names.get(int(index))
            entry = by_tensor.get(name) if name is not None else None
            if entry is None or not entry.fused or entry.layer in exclude:  # "Identity": no layer to name
                continue
            added = entry.rmse_over_scale - max(upstream, default=0.0)
            best = scores.get(entry.layer)
            if best is None or added > best["added_error"]:
                scores[entry.layer] = {"layer": entry.layer, "op": entry.op, "added_error": round(added, 4),
                                       "rmse_over_scale": round(entry.rmse_over_scale, 4)}
    return sorted(scores.values(), key=lambda s: -s["added_error"])


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


@dataclass
class _State:
    layers: list[str]
    model: bytes = field(repr=False)  # the quantizer's output (what a splice starts from)
    written: bytes = field(repr=False)  # the model as it is written: after the graph rewrites kept
    optimizations: list[dict]
    figures: dict  # measured on ``written``, on the search images


class _WrittenOverBudget(Exception):
    """Raised by the manifest hook before anything is written: the bytes about to be written miss the budget."""


@measured_as("search")  # the written manifest's timing covers the whole search
def convert_within_budget(model_path, settings: ConvertSettings, *, representative, eval_dir, max_drop_pp: float,
                          labels=None, max_float_layers: int = 8, candidates: int = 3, eval_limit: int | None = None,
                          layer_samples: int = 16, out=None, force: bool = False, source=None,
                          latency: LatencyCheck | None = None, say: Say = lambda s: None,
                          progress=None, holdout: bool = True) -> BudgetResult:
    """Convert ``model_path`` so its top-1 drop on ``eval_dir`` is at most ``max_drop_pp``.

    ``labels`` (a labels.json) maps ``eval_dir``'s class folders to outputs, as in ``xedge validate``.
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
    if settings.mode not in CALIBRATED_MODES:
        raise ConversionError(f"--max-drop applies to --int8 and --int16x8, not --{settings.mode}")
    if not (max_drop_pp >= 0):
        raise ConversionError(f"--max-drop must be >= 0 percentage points, got {max_drop_pp}")
    if max_float_layers < 0 or candidates < 1:
        raise ConversionError("--max-float-layers must be >= 0 and candidates >= 1")
    model_path = Path(model_path)
    out_path = Path(out) if out is not None else default_output(model_path, settings.mode)
    artifacts.check_writable(out_path, force=force)
    search = _BudgetSearch(model_path, settings, representative, source, progress, say)
    search.meter = DropMeter(model_path, eval_dir, labels=labels, limit=eval_limit,
                             trust_code=settings.trust_model_code, holdout=holdout,
                             convention=search.settings.decided_convention)
    meter = search.meter
    say(f"measuring on {len(meter.inputs)} eval images (float top-1 {meter.top1_float:.4f}), "
        + (f"{meter.heldout_images} more held out to judge the result; " if meter.heldout_images
           else f"{meter.holdout_note}; ") + f"budget {max_drop_pp:g} pp")
    best, baseline, steps = search.run(max_drop_pp, max_float_layers, candidates, layer_samples)
    latency_figures = None
    if latency and best.layers:  # bench what would be written: both with the graph rewrites kept
        latency_figures = _latency(latency, baseline.written, best.written)
    record = {"budget_top1_drop_pp": max_drop_pp, "max_float_layers": max_float_layers, "steps": steps,
              "eval": {"folder": str(eval_dir), "limit": eval_limit}, "latency": latency_figures}
    return search.finish(best, out_path, record, force)


class _BudgetSearch:
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
        self.baseline: _State | None = None

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

    def quantize_with(self, layers: list[str]) -> _State:
        if layers and self.method == "splice":
            if self.baseline is None:
                raise ConversionError("splicing float layers needs the all-quantized baseline first (run)")
            model = splice(self.baseline.model, self.donor(), layers)
        else:
            model = convert_bytes(self.source, replace(self.settings, float_layers=tuple(layers)),
                                  self.representative, self.progress)
        written, optimizations = self.prepare(model)
        return _State(list(layers), model, written, optimizations, self.meter.measure(written))

    def run(self, max_drop_pp: float, max_float_layers: int, candidates: int,
            layer_samples: int) -> tuple[_State, _State, list[dict]]:
        """(best, all-quantized baseline, steps): add the layer whose float copy lowers the drop most, until
        the drop is within budget or ``max_float_layers`` are kept out."""
        state = self.quantize_with([])
        steps = [{"float_layers": [], "top1_drop_pp": state.figures["top1_drop_pp"],
                  "top1": state.figures["top1_quant"], "rewrites": _applied(state)}]
        self.say(f"step 0: all layers quantized: drop {state.figures['top1_drop_pp']:.2f} pp")
        self.baseline, best = state, state
        while state.figures["top1_drop_pp"] > max_drop_pp and len(state.layers) < max_float_layers:
            step = self.step(state, candidates, layer_samples)
            if step is None:
                break
            state, entry = step
            steps.append(entry)
            if state.figures["top1_drop_pp"] < best.figures["top1_drop_pp"]:
                best = state
        if state.figures["top1_drop_pp"] <= max_drop_pp:
            best = state  # the search stops at the first state within budget: the fewest float layers
        for entry in best.optimizations:
            gate = (entry.get("check") or {}).get("gate")
            if gate and not gate["accepted"]:
                self.say(f"graph rewrite {entry['name']} left out: it changes the top-1 prediction on "
                         f"{gate['eval_top1_changed']} of {gate['eval_images']} eval images (recorded in the manifest)")
        return best, self.baseline, steps

    def step(self, state: _State, candidates: int, layer_samples: int) -> tuple[_State, dict] | None:
        """One step: rank the layers by added error, measure the top ``candidates`` kept out, keep the best."""
        float_bytes = float_tflite(self.source)  # converted once per source, shared with the int8 stages
        ranked = rank_layers(float_bytes, state.written, self.meter.inputs_for(state.written)[:layer_samples],
                             exclude=set(state.layers))
        trials = [(self.quantize_with(state.layers + [entry["layer"]]), entry) for entry in ranked[:candidates]]
        if not trials:
            return None
        trial, entry = min(trials, key=lambda t: t[0].figures["top1_drop_pp"])  # stable: ties keep the rank order
        record = {"float_layers": list(trial.layers), "added": entry["layer"],
                  "top1_drop_pp": trial.figures["top1_drop_pp"], "top1": trial.figures["top1_quant"],
                  "rewrites": _applied(trial), "ranked": ranked[:candidates],
                  "tried": [{"layer": e["layer"], "top1_drop_pp": t.figures["top1_drop_pp"]} for t, e in trials]}
        tried = ", ".join(e["layer"] for _, e in trials)
        self.say(f"step {len(trial.layers)}: {entry['layer']} kept in {self.kept_in} (tried {tried}): "
                 f"drop {trial.figures['top1_drop_pp']:.2f} pp")
        return trial, record

    def judge(self, model_bytes: bytes) -> tuple[dict, dict | None, str, float]:
        """Search and held-out figures of these bytes, and the figure the budget is gated on."""
        search = self.meter.measure(model_bytes)
        held = self.meter.measure(model_bytes, "heldout") if self.meter.heldout_images else None
        gate_on = "heldout" if held else "search"
        return search, held, gate_on, (held or search)["top1_drop_pp"]

    def fallback_record(self, model_bytes: bytes, best: _State, record: dict, reached: bool) -> dict:
        """The manifest's ``float_fallback``, measured on the bytes on disk (after the graph rewrites)."""
        search, held, gate_on, gate_pp = self.judge(model_bytes)
        meter = self.meter
        return {
            **record, "reached": reached, "method": self.method, "kept_in": self.kept_in,
            "layers": list(best.layers), "final_top1_drop_pp": search["top1_drop_pp"], "final": search,
            "heldout": held, "heldout_top1_drop_pp": held["top1_drop_pp"] if held else None,
            "heldout_top1_drop_ci95_pp": held["top1_drop_ci95_pp"] if held else None,
            "gate": {"on": gate_on, "top1_drop_pp": gate_pp, "reason": meter.holdout_note},
            "eval": {**record["eval"], "images": len(meter.all_inputs), "search_images": len(meter.inputs),
                     "heldout_images": meter.heldout_images, "holdout_min_per_class": HOLDOUT_MIN_PER_CLASS,
                     "holdout": meter.holdout_note, "labels": meter.labels_source, "top1_float": meter.top1_float},
            "search_s": round(time.perf_counter() - self.t0, 3)}

    def write(self, target: Path, best: _State, record: dict, reached: bool, force: bool) -> ExportResult:
        max_drop_pp = record["budget_top1_drop_pp"]

        def annotate(model_bytes: bytes) -> dict:
            if reached and self.judge(model_bytes)[3] > max_drop_pp:  # checked before anything is written
                raise _WrittenOverBudget
            return {"float_fallback": self.fallback_record(model_bytes, best, record, reached)}

        settings = replace(self.settings, float_layers=tuple(best.layers), input_convention=self.asked)
        return export_tflite(self.model_path, settings, out=target, representative=self.representative,
                             force=force or not reached, source=self.original, annotate=annotate,
                             optimize=self.prepare)

    def finish(self, best: _State, out_path: Path, record: dict, force: bool) -> BudgetResult:
        """Write the chosen model (or, over budget, the best one beside the output) and say what was reached."""
        max_drop_pp = record["budget_top1_drop_pp"]
        _, held, _, gate_pp = self.judge(best.written)
        searched = best.figures["top1_drop_pp"] <= max_drop_pp
        reached = searched and gate_pp <= max_drop_pp
        over_path = out_path.with_name(f"{out_path.stem}_over_budget.tflite")
        try:
            exported = self.write(out_path if reached else over_path, best, record, reached, force)
        except _WrittenOverBudget:  # the conversion for the output differed from the one measured
            exported = self.write(over_path, best, record, False, force)
            written = exported.manifest["float_fallback"]["gate"]["top1_drop_pp"]
            raise BudgetNotReached(f"the written model's top-1 drop is {written:.2f} pp (the search measured "
                                   f"{gate_pp:.2f} pp on the same images); it is kept as {exported.path} for "
                                   "inspection") from None
        if not reached:
            raise BudgetNotReached(self.over_budget(best, held, gate_pp, max_drop_pp, searched, exported,
                                                    record["max_float_layers"]))
        written = exported.manifest["float_fallback"]
        return BudgetResult(exported, list(best.layers), record["steps"], written["final"], record["latency"],
                            max_drop_pp, written["heldout"])

    def over_budget(self, best: _State, held, gate_pp: float, max_drop_pp: float, searched: bool,
                    exported: ExportResult, max_float_layers: int) -> str:
        """Why the budget was not reached: the search itself, or the held-out images."""
        layers = ", ".join(best.layers) or "none"
        if not searched:
            return (f"top-1 drop {best.figures['top1_drop_pp']:.2f} pp is over the {max_drop_pp:g} pp budget even "
                    f"with {len(best.layers)} layers in {self.kept_in} ({layers}; --max-float-layers "
                    f"{max_float_layers}); the best model is kept as {exported.path} for inspection")
        lo, hi = held["top1_drop_ci95_pp"]
        return (f"on the {self.meter.heldout_images} held-out eval images the top-1 drop is {gate_pp:.2f} pp "
                f"(95% CI {lo:.2f} to {hi:.2f}), over the {max_drop_pp:g} pp budget; the search reached "
                f"{best.figures['top1_drop_pp']:.2f} pp on its {len(self.meter.inputs)} images with "
                f"{len(best.layers)} layers in {self.kept_in} ({layers}); the model is kept as {exported.path} "
                "for inspection")


def _applied(state: _State) -> list[str]:
    return [e["name"] for e in state.optimizations if e.get("applied")]


def _latency(check: LatencyCheck, before: bytes, after: bytes) -> dict:
    """The fallback's latency cost, measured on the two models (written to a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="xedge-fallback-") as tmp:
        a, b = Path(tmp) / "all_quantized.tflite", Path(tmp) / "with_fallback.tflite"
        a.write_bytes(before)
        b.write_bytes(after)
        return check(a, b)


__all__ = ["HOLDOUT_MIN_PER_CLASS", "BudgetResult", "DropMeter", "convert_within_budget", "holdout_split",
           "rank_layers"]

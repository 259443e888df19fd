"""Convert to int8 (or int16x8) within a top-1 drop budget, keeping the most harmful layers in float (or int16).

TFLite has the means (per-layer error, ``denylisted_nodes``) but no loop that
guarantees a budget; OpenVINO NNCF's ``quantize_with_accuracy_control`` is the
model for this one: measure, rank, revert the worst layer to float, measure
again. Ranking alone is not trusted: per-layer error is accumulated through
the network, so the few layers where it *jumps* are candidates, and each
candidate is measured on the eval images (keep it float, re-quantize, measure
the drop); the best one is kept. Steps are recorded in the manifest.

How a layer is kept out is ``pipeline.float_fallback.method_for``'s choice:
int8 to float re-quantizes with the MLIR quantizer's denylist; int16x8 to
float, and int8 to int16 (``fallback="int16"``), splice the layer's ops from
a second conversion of the source (``pipeline.splice``): the quantized
model and the donor are each converted once for the search, and every
candidate is a splice of the two.

The drop is computed by the same pieces as ``xedge validate`` (discovery,
round-robin limit, preprocessing, label mapping, ``drift_metrics``), with the
eval images decoded and the float model run once for the whole search.
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import BudgetNotReached, ConversionError, ValidationError
from pipeline.export import (CALIBRATED_MODES, ConvertSettings, ExportResult, convert_bytes, converted_source,
                             default_output, export_tflite, float_tflite, optimize_graph, representative_in, resolved)
from pipeline.preprocessing import LEGACY_CONVENTION, model_input
from pipeline.tflite_info import stated_convention

Say = Callable[[str], None]
# (all quantized, with fallback) .tflite paths -> latency figures; passed in: devices/ is not imported here
LatencyCheck = Callable[[Path, Path], dict]


class DropMeter:
    """Top-1 drop of candidate .tflite bytes against the float model, on images decoded once.

    The reference is fed the decoded pixels as its own convention says; a
    candidate as its input quantization states (``convention``, the one the
    search converts for, where it states none: float I/O).
    """

    def __init__(self, reference, data, *, limit: int | None = None, workers: int | None = None,
                 trust_code: bool = False, convention: str = LEGACY_CONVENTION):
        from pipeline.data import discover
        from pipeline.metrics import topk
        from pipeline.predict import as_probabilities, default_workers, open_runner
        from pipeline.preprocessing import PreprocessSpec
        from pipeline.validate import _load, _select, resolve_labels

        found = discover(data, what="eval folder")
        if not found.labeled:
            raise ValidationError(f"--eval needs labeled images (one subfolder per class); {data} is flat")
        self.workers = workers or default_workers()
        runner = open_runner(reference, workers=self.workers, trust_code=trust_code)
        try:
            names, self.labels_source = resolve_labels(None, Path(reference), Path(reference), found.classes,
                                                       runner.facts.classes)
            spec = PreprocessSpec(size=runner.facts.input_size)
            loaded = [(item, _load(item, spec)[0]) for item in _select(found.items, limit)]
            loaded = [(item, x) for item, x in loaded if x is not None]
            if not loaded:
                raise ValidationError(f"no usable images in {data}")
            self.pixels = np.stack([x for _, x in loaded])
            self.reference, _ = as_probabilities(runner.predict_pixels(self.pixels), "reference")
        finally:
            runner.close()
        index_of = {name: i for i, name in enumerate(names)}
        self.labels = np.asarray([index_of[item.label] for item, _ in loaded])
        self.names = names
        self.convention = convention
        self.inputs = model_input(self.pixels, convention)
        self.top1_float = float(np.mean(topk(self.reference, 1)[:, 0] == self.labels))

    def predict(self, model_bytes: bytes) -> np.ndarray:
        """Outputs of bytes this process just converted (trusted: no sandboxed first load needed)."""
        from pipeline.predict import open_interpreter
        from pipeline.preprocessing import dequantize, quantize

        convention = stated_convention(model_bytes) or self.convention
        inputs = self.inputs if convention == self.convention else model_input(self.pixels, convention)
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
        rows = [None] * len(self.inputs)
        for k, part in enumerate(parts):
            rows[k::self.workers] = part
        return np.stack(rows)

    def measure(self, model_bytes: bytes) -> dict:
        from pipeline.metrics import drift_metrics
        from pipeline.predict import as_probabilities

        cand, _ = as_probabilities(self.predict(model_bytes), "candidate")
        m = drift_metrics(self.reference, cand, self.labels, self.names)
        return {"top1_drop_pp": round(m["top1_drop_pp"], 4), "top1_float": m["top1_float"],
                "top1_quant": m["top1_quant"], "agreement": m["agreement"], "kl_mean": m["kl_mean"],
                "samples": m["samples"]}


def rank_layers(float_bytes: bytes, quant_bytes: bytes, inputs, exclude=()) -> list[dict]:
    """Layers by the error each one *adds* (its RMSE/scale minus the worst of its inputs'), worst first."""
    from pipeline.layer_error import layer_errors
    from pipeline.predict import open_interpreter

    errors = layer_errors(float_bytes, quant_bytes, inputs)
    by_tensor = {e.tensor: e for e in errors}
    interpreter = open_interpreter(quant_bytes)  # names and op wiring only; nothing runs
    names = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    scores: dict[str, dict] = {}
    for op in interpreter._get_ops_details():  # noqa: SLF001 - the only API that maps ops to tensors
        upstream = [by_tensor[names[int(i)]].rmse_over_scale for i in op["inputs"]
                    if int(i) >= 0 and names.get(int(i)) in by_tensor]
        for index in op["outputs"]:
            entry = by_tensor.get(names.get(int(index)))
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

    @property
    def record(self) -> dict:
        return self.export.manifest["float_fallback"]


@dataclass
class _State:
    layers: list[str]
    model: bytes = field(repr=False)
    figures: dict


def convert_within_budget(model_path, settings: ConvertSettings, *, representative, eval_dir, max_drop_pp: float,
                          max_float_layers: int = 8, candidates: int = 3, eval_limit: int | None = None,
                          layer_samples: int = 16, out=None, force: bool = False, source=None,
                          latency: LatencyCheck | None = None, say: Say = lambda s: None,
                          progress=None) -> BudgetResult:
    """Convert ``model_path`` so its top-1 drop on ``eval_dir`` is at most ``max_drop_pp``.

    Raises ``BudgetNotReached`` (exit 3) when ``max_float_layers`` float layers
    are not enough; the best model found is then written beside the output as
    ``<name>_over_budget.tflite`` with its manifest, for inspection.
    """
    from pipeline import artifacts
    from pipeline.float_fallback import donor_model, method_for
    from pipeline.modelio import load_source

    if settings.mode not in CALIBRATED_MODES:
        raise ConversionError(f"--max-drop applies to --int8 and --int16x8, not --{settings.mode}")
    if not (max_drop_pp >= 0):
        raise ConversionError(f"--max-drop must be >= 0 percentage points, got {max_drop_pp}")
    if max_float_layers < 0 or candidates < 1:
        raise ConversionError("--max-float-layers must be >= 0 and candidates >= 1")
    t0 = time.perf_counter()
    model_path = Path(model_path)
    out_path = Path(out) if out is not None else default_output(model_path, settings.mode)
    artifacts.check_writable(out_path, force=force)
    source = source or load_source(model_path, trust_code=settings.trust_model_code)
    asked = settings.input_convention
    # The gate on float compute ops is what this search relaxes on purpose.
    settings = replace(settings, allow_float_fallback=True, float_layers=())
    settings, _ = resolved(source, settings)  # one input convention for every candidate
    work = converted_source(source, settings.input_convention)  # folded once where the input is pixels
    representative = representative_in(representative, settings.input_convention)
    method, kept_in = method_for(settings), settings.fallback
    meter = DropMeter(model_path, eval_dir, limit=eval_limit, trust_code=settings.trust_model_code,
                      convention=settings.input_convention)
    say(f"measuring on {len(meter.inputs)} eval images (float top-1 {meter.top1_float:.4f}), "
        f"budget {max_drop_pp:g} pp")

    converted: dict[str, bytes] = {}

    def donor() -> bytes:
        if "donor" not in converted:
            converted["donor"] = donor_model(work, settings, representative)
        return converted["donor"]

    def quantize_with(layers: list[str]) -> _State:
        if layers and method == "splice":
            from pipeline.splice import splice

            model = splice(baseline.model, donor(), layers)
        else:
            model = convert_bytes(work, replace(settings, float_layers=tuple(layers)), representative, progress)
        return _State(list(layers), model, meter.measure(model))

    baseline = None
    state = quantize_with([])
    steps = [{"float_layers": [], "top1_drop_pp": state.figures["top1_drop_pp"], "top1": state.figures["top1_quant"]}]
    say(f"step 0: all layers quantized: drop {state.figures['top1_drop_pp']:.2f} pp")
    baseline, best = state, state
    while state.figures["top1_drop_pp"] > max_drop_pp and len(state.layers) < max_float_layers:
        float_bytes = float_tflite(work)  # converted once per source, shared with the int8 stages
        ranked = rank_layers(float_bytes, state.model, meter.inputs[:layer_samples], exclude=set(state.layers))
        trials = []
        for entry in ranked[:candidates]:
            trial = quantize_with(state.layers + [entry["layer"]])
            trials.append((trial, entry))
        if not trials:
            break
        trial, entry = min(trials, key=lambda t: t[0].figures["top1_drop_pp"])  # stable: ties keep the rank order
        state = trial
        steps.append({"float_layers": list(state.layers), "added": entry["layer"],
                      "top1_drop_pp": state.figures["top1_drop_pp"], "top1": state.figures["top1_quant"],
                      "ranked": ranked[:candidates],
                      "tried": [{"layer": e["layer"], "top1_drop_pp": t.figures["top1_drop_pp"]} for t, e in trials]})
        tried = ", ".join(e["layer"] for _, e in trials)
        say(f"step {len(steps) - 1}: {entry['layer']} kept in {kept_in} (tried {tried}): "
            f"drop {state.figures['top1_drop_pp']:.2f} pp")
        if state.figures["top1_drop_pp"] < best.figures["top1_drop_pp"]:
            best = state
    if state.figures["top1_drop_pp"] <= max_drop_pp:
        best = state  # the search stops at the first state within budget: the fewest float layers
    reached = best.figures["top1_drop_pp"] <= max_drop_pp
    target = out_path if reached else out_path.with_name(f"{out_path.stem}_over_budget.tflite")
    latency_figures = None
    if latency and best.layers:
        before, after = baseline.model, best.model
        if settings.optimize:  # bench what would be written: both with the graph rewrites
            before, after = (optimize_graph(m, work, representative)[0] for m in (before, after))
        latency_figures = _latency(latency, before, after)

    final: dict = {}

    def annotate(model_bytes: bytes) -> dict:
        final.update(meter.measure(model_bytes))  # the bytes on disk, after the graph rewrites
        return {"float_fallback": {
            "budget_top1_drop_pp": max_drop_pp, "max_float_layers": max_float_layers, "reached": reached,
            "method": method, "kept_in": kept_in, "layers": list(best.layers), "steps": steps,
            "final_top1_drop_pp": final["top1_drop_pp"],
            "final": final, "eval": {"folder": str(eval_dir), "images": len(meter.inputs), "limit": eval_limit,
                                     "labels": meter.labels_source, "top1_float": meter.top1_float},
            "latency": latency_figures, "search_s": round(time.perf_counter() - t0, 3)}}

    exported = export_tflite(model_path, replace(settings, float_layers=tuple(best.layers), input_convention=asked),
                             out=target, representative=representative, force=force or not reached, source=source,
                             annotate=annotate)
    if not reached:
        raise BudgetNotReached(
            f"top-1 drop {best.figures['top1_drop_pp']:.2f} pp is over the {max_drop_pp:g} pp budget even with "
            f"{len(best.layers)} layers in {kept_in} ({', '.join(best.layers) or 'none'}; --max-float-layers "
            f"{max_float_layers}); the best model is kept as {exported.path} for inspection")
    if final["top1_drop_pp"] > max_drop_pp:  # the rewrites are checked to do no harm; say it if they did
        raise BudgetNotReached(f"the written model's top-1 drop is {final['top1_drop_pp']:.2f} pp after the graph "
                               f"rewrites (search measured {best.figures['top1_drop_pp']:.2f} pp); "
                               "retry with --no-optimize")
    return BudgetResult(exported, list(best.layers), steps, final, latency_figures, max_drop_pp)


def _latency(check: LatencyCheck, before: bytes, after: bytes) -> dict:
    """The fallback's latency cost, measured on the two models (written to a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="xedge-fallback-") as tmp:
        a, b = Path(tmp) / "all_quantized.tflite", Path(tmp) / "with_fallback.tflite"
        a.write_bytes(before)
        b.write_bytes(after)
        return check(a, b)


__all__ = ["BudgetResult", "DropMeter", "convert_within_budget", "rank_layers"]

"""Every conversion mode of one model, validated and benched, in one table.

A user choosing between float16, int8 and int8-with-fallback needs accuracy,
latency and size side by side, measured the same way. Each mode is converted
with ``export_tflite`` (the fallback with ``convert_within_budget``), checked
with ``validate`` against the float source, and benched with the ``bench``
callable the caller passes in (``devices`` may not be imported from here).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.conversion.export import ConvertSettings, export_tflite
from pipeline.core import artifacts
from pipeline.core.data import discover
from pipeline.core.errors import BudgetNotReached, ConversionError
from pipeline.conversion.settings import Representative
from pipeline.model.modelio import SourceModel, load_source
from pipeline.validation.accuracy_budget import BudgetSettings, convert_within_budget
from pipeline.validation.sweep_report import render_html, render_markdown
from pipeline.validation.validate import resolve_labels, validate

# name -> (mode, settings overrides); "int8-fallback" is int8 under an accuracy budget
SWEEP_MODES: dict[str, tuple[str, dict]] = {
    "float": ("float", {}),
    "dynamic": ("dynamic", {}),
    "fp16": ("fp16", {}),
    "int8": ("int8", {}),  # the defaults: bias correction on
    "int8-per-tensor": ("int8", {"per_channel": False}),
    "int8-plain": ("int8", {"bias_correction": False}),  # min/max ranges, nearest rounding, the quantizer's biases
    "int8-bias-correction": ("int8", {"bias_correction": True}),
    "int8-learned-rounding": ("int8", {"rounding": "learned", "bias_correction": False}),
    "int8-learned-bc": ("int8", {"rounding": "learned", "bias_correction": True}),
    "int8-mse-ranges": ("int8", {"ranges": "mse", "bias_correction": False}),
    "int8-equalize": ("int8", {"equalize": True}),  # cross-layer equalization, then the defaults
    "int8-fallback": ("int8", {}),
    "int16x8": ("int16x8", {}),
}
# What a sweep runs unless told otherwise; the int8 method rows are asked for by name (each calibrates again).
DEFAULT_MODES = ("float", "dynamic", "fp16", "int8", "int8-per-tensor", "int8-fallback", "int16x8")
Bench = Callable[[Path], dict]  # .tflite -> {"p50_ms": ..., "p90_ms": ...}


@dataclass
class SweepResult:
    rows: list[dict]
    paths: dict[str, Path]
    record: dict


@dataclass(frozen=True)
class _Sweep:
    """What every mode of one sweep shares: the source, its data and budget, where the models go."""
    model_path: Path
    source: SourceModel
    representative: Representative | None
    eval_dir: str | os.PathLike
    out_dir: Path
    labels: str | os.PathLike | None  # a labels file
    max_drop_pp: float
    max_float_layers: int
    eval_limit: int | None
    force: bool
    trust_model_code: bool
    say: Callable[[str], None]


def run_sweep(model_path, *, representative, eval_dir, out_dir, labels=None, bench: Bench | None = None,
              max_drop_pp: float = 1.0, max_float_layers: int = 8, eval_limit: int | None = None,
              modes=DEFAULT_MODES, force: bool = False, say: Callable[[str], None] = lambda s: None,
              trust_model_code: bool = False) -> SweepResult:
    unknown = [m for m in modes if m not in SWEEP_MODES]
    if unknown:
        raise ConversionError(f"unknown sweep mode(s) {', '.join(unknown)}; choose from {', '.join(SWEEP_MODES)}")
    t0 = time.perf_counter()
    model_path, out_dir = Path(model_path), Path(out_dir)
    source = load_source(model_path, trust_code=trust_model_code)
    # The labels are checked before anything is converted or written: a mismatch fails in seconds.
    found = discover(eval_dir, what="eval folder")
    _, labels_source = resolve_labels(labels, model_path, model_path, found.classes, source.classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = _Sweep(model_path, source, representative, eval_dir, out_dir, labels, max_drop_pp, max_float_layers,
                   eval_limit, force, trust_model_code, say)
    rows, samples = [], None
    for name in modes:
        row, samples = _sweep_mode(sweep, name, bench)
        rows.append(row)
    record = artifacts.base_manifest("sweep")
    record.update({"model": {"path": str(model_path), "sha256": artifacts.sha256_any(model_path)},
                   "eval": {"folder": str(eval_dir), "limit": eval_limit, "images": samples,
                            "labels": labels_source},
                   "budget_top1_drop_pp": max_drop_pp, "max_float_layers": max_float_layers,
                   "latency": "p50/p90 ms from the bench callable" if bench is not None else None,
                   "rows": rows, "seconds": round(time.perf_counter() - t0, 2)})

    paths = {"json": artifacts.atomic_write_json(out_dir / "sweep.json", record),
             "md": artifacts.atomic_write_bytes(out_dir / "sweep.md", render_markdown(record).encode()),
             "html": artifacts.atomic_write_bytes(out_dir / "sweep.html", render_html(record).encode())}
    return SweepResult(rows, paths, record)


def _sweep_mode(sweep: _Sweep, name: str, bench: Bench | None) -> tuple[dict, int]:
    """Convert, validate and bench one mode: its table row, and the number of images validated."""
    mode, overrides = SWEEP_MODES[name]
    settings = ConvertSettings(mode, trust_model_code=sweep.trust_model_code, **overrides)
    target = sweep.out_dir / f"model_{name}.tflite"
    t = time.perf_counter()
    sweep.say(f"{name}: converting")
    calibration = sweep.representative if mode in ("int8", "int16x8") else None
    if name == "int8-fallback":
        path, note, float_layers = _convert_fallback(sweep, settings, target)
    else:
        exported = export_tflite(sweep.model_path, settings, out=target, representative=calibration,
                                 force=sweep.force, source=sweep.source)
        path, note, float_layers = exported.path, _methods_note(exported.manifest), []
    convert_s = time.perf_counter() - t
    sweep.say(f"{name}: validating")
    report = validate(sweep.model_path, path, sweep.eval_dir, sweep.out_dir / "reports" / name, labels=sweep.labels,
                      limit=sweep.eval_limit, layer_samples=0, trust_code=sweep.trust_model_code).report
    latency = bench(path) if bench is not None else None
    row = {"mode": name, "path": str(path), "bytes": path.stat().st_size,
           "top1": report["top1_quant"], "top1_float": report["top1_float"],
           "top1_drop_pp": report["top1_drop_pp"], "drop_ci95_pp": report["top1_drop_ci95_pp"],
           "agreement": report["agreement"], "kl_mean": report["kl_mean"],
           "p50_ms": latency["p50_ms"] if latency else None,
           "p90_ms": latency["p90_ms"] if latency else None,
           "float_layers": float_layers, "note": note, "convert_s": round(convert_s, 2),
           "report": str(Path("reports") / name / "report.html")}
    return row, report["samples"]


def _methods_note(manifest: dict) -> str:
    """What the int8 methods of a row changed and what they cost, from its manifest."""
    calibration = (manifest.get("calibration") or {}).get("method") or {}
    parts = []
    if calibration.get("ranges"):
        ranges = calibration["ranges"]
        parts.append(f"{ranges['method']}: {ranges['clipped']} ranges clipped ({ranges['seconds']:.1f} s)")
    methods = calibration.get("int8_methods")
    if methods:
        parts += [f"{m['method']}: {len(m['layers'])} layers" for m in methods["methods"]]
        parts[-1] += f" ({methods['seconds']:.1f} s on {methods['samples']} images)"
    return "; ".join(parts)


def _convert_fallback(sweep: _Sweep, settings: ConvertSettings, target: Path) -> tuple[Path, str, list]:
    """int8 under the accuracy budget: the model written (``_over_budget`` when the budget was not reached),
    the row's note and the layers left in float."""
    note = ""
    try:
        budget = BudgetSettings(sweep.max_drop_pp, sweep.eval_dir, labels=sweep.labels, eval_limit=sweep.eval_limit,
                                max_float_layers=sweep.max_float_layers)
        exported = convert_within_budget(sweep.model_path, settings, budget, representative=sweep.representative,
                                         out=target, force=sweep.force, source=sweep.source).export
    except BudgetNotReached as exc:
        note = f"budget {sweep.max_drop_pp:g} pp not reached"
        target = target.with_name(f"{target.stem}_over_budget.tflite")
        exported = None
        sweep.say(f"int8-fallback: {exc}")
    manifest = artifacts.read_manifest(artifacts.manifest_path_for(target))
    float_layers = manifest["float_fallback"]["layers"]
    if not note:
        note = (f"{len(float_layers)} float layers" if float_layers
                else f"int8 already within {sweep.max_drop_pp:g} pp: no fallback")
    held = manifest["float_fallback"].get("heldout")
    if held:  # the budget is judged on the eval images the search did not use
        note += f"; {held['top1_drop_pp']:.2f} pp on {held['samples']} held-out images"
    else:
        note += "; nothing held out"
    return (exported.path if exported else target), note, float_layers

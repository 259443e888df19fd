"""Accuracy drift of a converted model against its float reference, on real labeled images.

The orchestrator of ``xedge validate``: finds the images, runs both models on
exactly the same decoded pixels (each fed as its input convention says: what
a device feeds it), computes the paired statistics, writes
report.json / report.md / report.html, and decides the budget policy. A
model that outputs NaN, or a folder without one usable image, is an error,
never a pass: a gate that passes when nothing was measured is worse than none.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.conversion.int8_methods import summary as int8_summary
from pipeline.core import artifacts
from pipeline.core.data import Item, discover
from pipeline.core.errors import BudgetExceeded, DataError, ModelLoadError, Remedy, ValidationError
from pipeline.core.preprocessing import PreprocessSpec, model_input
from pipeline.tflite.sandboxed_load import read_model_bytes
from pipeline.tflite.contents import inspect_tflite
from pipeline.tflite.twin import float_twin
from pipeline.validation.lanes import Predictions, Progress, first_pixels, load_item, predict_all
from pipeline.validation.layer_error import layer_errors
from pipeline.validation.metrics import confusion_change, drift_metrics, histogram, topk
from pipeline.validation.predict import as_probabilities, default_workers, open_runner
from pipeline.validation.reference import (
    REFERENCE_CHECK_SAMPLES,
    REFERENCE_TOLERANCE,
    FloatModel,
    NoFloatModel,
    ReferenceRunner,
    check_tolerance,
    domain_of,
    float_reference,
)
from pipeline.validation.report_html import render_html
from pipeline.validation.report_md import render_markdown
from pipeline.validation.throughput import Floor, measure_floor

REPORT_SCHEMA = 1
MAX_FLIPS_LISTED = 500

@dataclass(frozen=True)
class Budgets:
    max_top1_drop_pp: float | None = None
    min_agreement: float | None = None
    max_kl: float | None = None

    def __post_init__(self):
        for name in ("max_top1_drop_pp", "max_kl"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValidationError(f"{name} must be a number >= 0, got {value}")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise ValidationError(f"min_agreement is a fraction in [0, 1], got {self.min_agreement}")

    def check(self, report: dict) -> tuple[dict, list[str]]:
        """Per-budget verdicts and one message per miss (saying by how much)."""
        verdicts: dict[str, dict] = {}
        misses: list[str] = []

        def judge(name, value, limit, worse, unit, fmt):
            ok = not worse(value, limit)
            verdicts[name] = {"limit": limit, "value": value, "passed": ok}
            if not ok:
                misses.append(f"{name.replace('_', ' ')}: {fmt(value)}{unit} vs budget {fmt(limit)}{unit} "
                              f"(over by {fmt(abs(value - limit))}{unit})")

        if self.max_top1_drop_pp is not None:
            judge("top1_drop", report["top1_drop_pp"], self.max_top1_drop_pp, lambda v, l: v > l, " pp",
                  lambda v: f"{v:.2f}")
        if self.min_agreement is not None:
            judge("agreement", report["agreement"], self.min_agreement, lambda v, l: v < l, "",
                  lambda v: f"{v:.4f}")
        if self.max_kl is not None:
            judge("kl_mean", report["kl_mean"], self.max_kl, lambda v, l: v > l, " nats", lambda v: f"{v:.4g}")
        return verdicts, misses


@dataclass
class ValidationResult:
    report: dict
    paths: dict[str, Path]
    misses: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.misses

    def raise_for_budgets(self) -> None:
        if self.misses:
            raise BudgetExceeded("budget exceeded: " + "; ".join(self.misses) + f" (report: {self.paths['html']})")


# ---------------------------------------------------------------- labels


def _labels_file(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    candidate = folder / "labels.json"
    return candidate if candidate.is_file() else None


def _read_labels(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read labels {path}: {exc}") from None
    classes = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(classes, list) or not classes:
        raise DataError(f"labels {path} must be a list of class names or {{\"classes\": [...]}}")
    return [str(c) for c in classes]


def _manifest_of(model: Path) -> tuple[dict | None, str | None]:
    """The manifest record of a .tflite's bytes (``artifacts.describing``), or why it could not be read (said in
    the report, never hidden)."""
    manifest = artifacts.manifest_path_for(model)
    if model.suffix.lower() != ".tflite" or not manifest.is_file():
        return None, None
    try:
        found = artifacts.read_manifest(manifest)
    except artifacts.ArtifactError as exc:
        return None, str(exc)
    return artifacts.describing(found, read_model_bytes(model)), None


def _manifest_labels(model: Path) -> list[str] | None:
    labels = (_manifest_of(model)[0] or {}).get("labels")
    return [str(c) for c in labels] if isinstance(labels, list) and labels else None


def resolve_labels(labels_file, reference: Path, candidate: Path, folders: list[str] | None,
                   classes: int) -> tuple[list[str], str]:
    """Output index -> class name, and where that mapping came from (said in the report)."""
    names: list[str] | None = None
    if labels_file:
        names, source = _read_labels(Path(labels_file)), f"--labels {labels_file}"
    else:
        for model in (reference, candidate):
            found = _labels_file(model)
            if found is not None:
                names, source = _read_labels(found), str(found)
                break
            manifest = _manifest_labels(model)
            if manifest:
                names, source = manifest, f"{artifacts.manifest_path_for(model)} (labels)"
                break
        if names is None and folders is not None:
            names, source = sorted(folders), "sorted class folder names"
        if names is None:
            names, source = [str(i) for i in range(classes)], "output indices (no labels found)"
    if len(names) != classes:
        raise ValidationError(f"{source} gives {len(names)} class names but the model has {classes} outputs",
                              remedy=None if labels_file else Remedy.LABELS)
    if folders is not None:
        unknown = sorted(set(folders) - set(names))
        if unknown:
            raise ValidationError(f"class folders {', '.join(unknown[:5])} are not among the model's labels "
                                  f"(from {source})", remedy=Remedy.LABELS)
    return names, source


# ---------------------------------------------------------------- data


def select_round_robin(items: list[Item], limit: int | None) -> list[Item]:
    """The first ``limit`` items taken round-robin over classes, so a limit never drops whole classes."""
    if limit is None or limit >= len(items):
        return items
    groups: dict = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    queues = [list(g) for g in groups.values()]
    chosen: list[Item] = []
    depth = 0
    while len(chosen) < limit:
        for q in queues:
            if depth < len(q) and len(chosen) < limit:
                chosen.append(q[depth])
        depth += 1
    return chosen


# ---------------------------------------------------------------- main


def input_approximation(manifest: dict) -> str | None:
    """The manifest's stated approximation of the input (a padded stem's pad pixel), with its measured effect."""
    stem = (manifest.get("input_convention") or {}).get("stem") or {}
    if stem.get("exact", True):
        return None
    zero = ", ".join(f"{p:g}" for p in dict.fromkeys(stem.get("zero_pad_pixel") or []))
    pad = ", ".join(str(p) for p in dict.fromkeys(stem.get("pad_pixel") or []))
    effect = stem.get("effect") or {}
    measured = (f"; float effect on {effect['images']} calibration images: top-1 agreement "
                f"{effect['top1_agreement']:.4f}, mean KL {effect['mean_kl']:.3g}" if "images" in effect else "")
    return f"stem padded with pixel {pad} where its zero is pixel {zero}" + measured


def _facts(runner, path: Path) -> dict:
    facts = runner.facts.to_dict()
    manifest, error = _manifest_of(path)
    if manifest is not None:
        facts["mode"] = (manifest.get("settings") or {}).get("mode")
        facts["source_sha256"] = (manifest.get("source") or {}).get("sha256")
        calibration = (manifest.get("calibration") or {}).get("method") or {}
        if calibration.get("int8_methods") or calibration.get("ranges") or calibration.get("equalize"):
            facts["int8_methods"] = int8_summary(calibration)
        approximation = input_approximation(manifest)
        if approximation:
            facts["input_approximation"] = approximation
    if error:
        facts["manifest_error"] = error
    facts.setdefault("mode", "float" if runner.facts.kind != "tflite" else None)
    return facts


def _layer_section(ref_runner, float_model: FloatModel | NoFloatModel | None, cand_runner,
                   pixels: list[np.ndarray]) -> dict:
    """Per-layer errors when the candidate is integer-quantized (int8, int16x8) and the reference its float source.

    Failures are reported in the section (the drift numbers stand on their own);
    a mismatch of models is "skipped", with the reason. Both models are fed
    the same float input, the candidate's: a Keras reference is converted with
    the candidate's scaling folded in where the candidate takes pixels (a
    second conversion: the reference runner's float .tflite computes the Keras
    model's own function, unfolded, so that it agrees with it to float
    rounding).
    """

    if getattr(cand_runner, "model_bytes", None) is None or not inspect_tflite(cand_runner.model_bytes).int_op_count:
        return {"status": "skipped", "reason": "the candidate is not an integer-quantized .tflite model"}
    if not pixels:
        return {"status": "skipped", "reason": "no layer samples asked for (layer_samples 0)"}
    t0 = time.perf_counter()
    domain = domain_of(cand_runner.convention)
    if not (isinstance(float_model, FloatModel) and float_model.domain == domain):
        float_model = float_reference(ref_runner, domain)
    if isinstance(float_model, NoFloatModel):
        return float_model.to_report()
    inputs = [model_input(p, cand_runner.convention) for p in pixels]
    twin = float_twin(float_model.model_bytes, cand_runner.model_bytes)
    try:
        errors = layer_errors(twin.model, cand_runner.model_bytes, inputs)
    except ValueError as exc:
        return {"status": "skipped", "reason": str(exc)}
    except (RuntimeError, ModelLoadError) as exc:  # an interpreter failing: say so, keep the drift numbers
        return {"status": "failed", "reason": f"{type(exc).__name__}: {str(exc)[:200]}"}
    rows = [e.to_dict() for e in errors]
    return {"status": "ok", "method": "float vs integer .tflite, all tensors preserved, matched by tensor name; "
            "RMSE of the dequantized output over its scale, accumulated through the network",
            "float_model": float_model.how + (", BatchNorms after a ReLU folded as in the candidate"
                                               if twin.folded else "")
            + (", its layer pairs equalized as in the candidate" if twin.equalized else ""),
            "samples": len(inputs), "count": len(rows),
            "worst": [r["layer"] for r in rows[:10]], "all": rows, "seconds": round(time.perf_counter() - t0, 3)}


def _flips(paths, names, labels, ref_pred, cand_pred, ref_conf, cand_conf) -> list[dict]:
    flips = []
    for i in np.flatnonzero(ref_pred != cand_pred)[:MAX_FLIPS_LISTED]:
        label = names[labels[i]] if labels is not None else None
        ref_name, cand_name = names[ref_pred[i]], names[cand_pred[i]]
        change = None if label is None else (
            "broken" if ref_name == label else "fixed" if cand_name == label else "still wrong")
        flips.append({"path": paths[i], "label": label, "reference": ref_name, "candidate": cand_name,
                      "reference_confidence": float(ref_conf[i]), "candidate_confidence": float(cand_conf[i]),
                      "change": change})
    return flips


def _list_hash(paths: list[str], root: Path) -> str:
    """Which images were used (relative paths), so two reports can be checked for being paired."""
    listing = "\n".join(os.path.relpath(p, root) for p in paths)
    return artifacts.sha256_bytes(listing.encode())


def validate(reference, candidate, data, out_dir, *, labels=None, budgets: Budgets = Budgets(),
             limit: int | None = None, layer_samples: int = 16, workers: int | None = None,
             trust_code: bool = False, progress: Progress | None = None,
             reference_tolerance: float = REFERENCE_TOLERANCE) -> ValidationResult:
    """Measure ``candidate``'s drift from ``reference`` on the images in ``data``; write the reports to ``out_dir``.

    A Keras reference runs as its float32 .tflite where that agrees with it on
    the run's first images within ``reference_tolerance`` (a probability
    difference; 0 keeps the Keras model): ``pipeline.validation.reference``.
    """

    laps = _Laps()
    reference, candidate, out_dir = Path(reference), Path(candidate), Path(out_dir)
    found = _checked_inputs(data, out_dir, limit, layer_samples, budgets)
    check_tolerance(reference_tolerance)
    workers = workers or default_workers()
    runners: list = []
    try:
        ref_runner = open_runner(reference, workers=workers, trust_code=trust_code)
        runners.append(ref_runner)
        cand_runner = open_runner(candidate, workers=workers, trust_code=trust_code)
        runners.append(cand_runner)
        _check_comparable(ref_runner.facts, cand_runner.facts)
        names, labels_source = resolve_labels(labels, reference, candidate, found.classes, ref_runner.facts.classes)
        spec = PreprocessSpec(size=ref_runner.facts.input_size)
        chosen = select_round_robin(found.items, limit)
        convert_s, float_model, ref = _reference_runner(ref_runner, workers, reference_tolerance)
        runners.append(ref)
        laps.lap("load_s")
        sample = first_pixels(chosen, spec, REFERENCE_CHECK_SAMPLES)
        if sample is not None:
            ref.check_on(sample)
        laps.lap("check_s")
        run = predict_all(chosen, spec, ref, cand_runner, workers, layer_samples, progress)
        laps.lap(None)  # the predicting phase is ``run.seconds``
        if not run.paths:
            example = f" (e.g. {run.skipped[0].path}: {run.skipped[0].reason})" if run.skipped else ""
            raise ValidationError(f"no usable images in {data}: all {len(chosen)} files were skipped{example}")
        floor = measure_floor(run.decoded, spec, ref, cand_runner, default_workers())
        laps.lap("floor_s")
        scored = _Scored.of(run, ref, cand_runner, names, found.labeled)
        layers = _layer_section(ref_runner, float_model, cand_runner, run.layer_inputs)
    finally:
        for runner in reversed(runners):
            runner.close()
    report = _report(reference, candidate, ref_runner, cand_runner, spec, found, run, scored, layers, names,
                     labels_source, limit)
    report["reference_runner"] = {**ref.check.to_report(), "convert_s": convert_s}
    verdicts, misses = budgets.check(report)
    report["budgets"] = verdicts
    report["passed"] = (not misses) if verdicts else None  # None: no budget given, nothing gated
    laps.lap("scoring_s")
    report["timing"] = _timing(run, floor, laps, workers)
    written = write_reports(report, out_dir, ref_conf=scored.ref_conf, cand_conf=scored.cand_conf)
    return ValidationResult(report, written, misses)


class _Laps:
    """Wall seconds of a validation's one-time steps, each from the end of the step before."""

    def __init__(self):
        self.start = self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str | None) -> None:
        now = time.perf_counter()
        if name:
            self.seconds[name] = round(now - self._last, 3)
        self._last = now


def _reference_runner(ref_runner, workers: int,
                      tolerance: float) -> tuple[float | None, FloatModel | NoFloatModel | None, ReferenceRunner]:
    """The runner that computes the reference's outputs and, for a Keras reference, its float .tflite (converted
    once, taking the model's own input: the same function to float rounding) with the conversion's seconds."""
    if getattr(ref_runner, "model_bytes", None) is not None:  # a .tflite reference runs as it is
        return None, None, ReferenceRunner(ref_runner, None, workers=workers, tolerance=tolerance)
    t0 = time.perf_counter()
    float_model = float_reference(ref_runner, domain_of(ref_runner.convention))
    convert_s = round(time.perf_counter() - t0, 3)
    return convert_s, float_model, ReferenceRunner(ref_runner, float_model, workers=workers, tolerance=tolerance)


def _timing(run: Predictions, floor: Floor | None, laps: _Laps, workers: int) -> dict:
    """images/s over the predicting phase alone (decode and both models, every image), beside the floor; the
    one-time steps (loading and converting, the reference check, the floor, scoring) in ``one_time``."""
    rate = round(len(run.paths) / run.seconds, 1) if run.seconds else None
    return {"predict_s": round(run.seconds, 3), "images_per_s": rate, "predict_cpu_s": round(run.cpu_s, 3),
            "total_s": round(time.perf_counter() - laps.start, 3), "workers": workers,
            **{k: round(v, 3) for k, v in run.parts.items()}, "one_time": dict(laps.seconds),
            "floor": floor.to_report(rate) if floor else None}


def _checked_inputs(data, out_dir: Path, limit, layer_samples: int, budgets: Budgets):
    """The image folder, found, after the options are checked: nothing is loaded for a request that cannot run."""
    if limit is not None and limit < 1:
        raise ValidationError(f"the image limit must be at least 1, got {limit}", setting="limit")
    if layer_samples < 0:
        raise ValidationError(f"layer_samples must be >= 0, got {layer_samples}", setting="layer_samples")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValidationError(f"report folder {out_dir} is a file")
    found = discover(data, what="validation folder")
    if budgets.max_top1_drop_pp is not None and not found.labeled:
        raise ValidationError(f"a top-1 drop budget needs labeled data (one subfolder per class); {data} is flat, "
                              "so only agreement and KL can be checked")
    return found


def _check_comparable(rf, cf) -> None:
    if rf.input_size != cf.input_size:
        raise ValidationError(f"the models take different input sizes ({rf.input_size} vs {cf.input_size} px); "
                              "they cannot be compared on the same inputs")
    if rf.classes != cf.classes:
        raise ValidationError(f"the models have different numbers of outputs ({rf.classes} vs {cf.classes})")


@dataclass
class _Scored:
    """Both models' probabilities turned into the paired statistics, predictions and flips."""

    summary: dict
    labels: np.ndarray | None
    ref_pred: np.ndarray
    cand_pred: np.ndarray
    ref_conf: np.ndarray
    cand_conf: np.ndarray
    flips: list[dict]

    @classmethod
    def of(cls, run: Predictions, ref_runner, cand_runner, names: list[str], labeled: bool) -> "_Scored":
        ref_p = as_probabilities(np.concatenate(run.reference), ref_runner.output_kind, "reference")
        cand_p = as_probabilities(np.concatenate(run.candidate), cand_runner.output_kind, "candidate")
        index_of = {name: i for i, name in enumerate(names)}
        labels_arr = np.asarray([index_of[str(label)] for label in run.labels]) if labeled else None
        summary = drift_metrics(ref_p, cand_p, labels_arr, names)
        ref_pred, cand_pred = topk(ref_p, 1)[:, 0], topk(cand_p, 1)[:, 0]
        ref_conf, cand_conf = ref_p.max(axis=1), cand_p.max(axis=1)
        flips = _flips(run.paths, names, labels_arr, ref_pred, cand_pred, ref_conf, cand_conf)
        return cls(summary, labels_arr, ref_pred, cand_pred, ref_conf, cand_conf, flips)


def _report(reference: Path, candidate: Path, ref_runner, cand_runner, spec: PreprocessSpec, found, run: Predictions,
            scored: _Scored, layers: dict, names: list[str], labels_source: str, limit) -> dict:
    """report.json's content before the budgets and timing (each model's input convention is in its facts)."""
    skipped = list(found.skipped) + run.skipped
    report = artifacts.base_manifest("validation")
    report["schema"] = REPORT_SCHEMA
    report.update({
        "reference": _facts(ref_runner, reference),
        "candidate": _facts(cand_runner, candidate),
        # Decoding and crop are shared; each model's input convention is in its facts above.
        "preprocessing": {k: v for k, v in spec.describe().items() if k != "input_convention"},
        "data": {"root": str(found.root.resolve()), "labeled": found.labeled, "labels_source": labels_source,
                 "classes": names, "folders": found.classes, "found": len(found.items), "limit": limit,
                 "used": len(run.paths), "images_sha256": _list_hash(run.paths, found.root),
                 "skipped": [s.to_dict() for s in skipped]},
        "outputs": {"reference": ref_runner.output_kind.describe(),
                    "candidate": cand_runner.output_kind.describe()},
        **scored.summary,
        "flips_total": int(np.sum(scored.ref_pred != scored.cand_pred)),
        "flips": scored.flips,
        "confusion_change": confusion_change(scored.ref_pred, scored.cand_pred, scored.labels, len(names)),
        "confidence": {"reference": histogram(scored.ref_conf), "candidate": histogram(scored.cand_conf)},
        "layers": layers,
    })
    return report


def write_reports(report: dict, out_dir: Path, *, ref_conf=None, cand_conf=None) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    artifacts.atomic_write_json(paths["json"], report)
    artifacts.atomic_write_bytes(paths["md"], render_markdown(report).encode())
    artifacts.atomic_write_bytes(paths["html"], render_html(report, ref_conf=ref_conf, cand_conf=cand_conf).encode())
    return paths


def read_report(path) -> dict:
    """A validation report written by this tool (for ``xedge diff``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise DataError(f"cannot read report {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"report {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != "validation" or data.get("tool") != artifacts.TOOL_NAME:
        raise DataError(f"{path} is not an xedge validation report (report.json)")
    if not isinstance(data.get("schema"), int) or data["schema"] > REPORT_SCHEMA:
        raise DataError(f"report {path} has schema {data.get('schema')}; this version reads up to {REPORT_SCHEMA}")
    return data


__all__ = ["Budgets", "ValidationResult", "validate", "read_report", "resolve_labels", "write_reports",
           "load_item"]

"""Parity: the same images through this machine's interpreter and through other runtimes, image by image.

``xedge validate`` measures what quantization did to a model; parity measures
what a runtime does to the same model: a device's interpreter (another
LiteRT or tflite-runtime version, another CPU), or a client such as
MediaPipe's ``ImageClassifier``. Every runtime gets the same model-size RGB
pixels (``parity_images``); for each image the report says whether top-1
matches this machine's, and the largest output difference: in quanta (the
output's scale) for a quantized output, as an absolute difference for a
float one. A target is anything with a ``name`` and a ``run(feed, step)``
(``Target``): the CLI passes device targets in from ``devices/``, which the
library does not import.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from pipeline.core import artifacts
from pipeline.core.errors import ParityFailed, Remedy, ValidationError
from pipeline.core.preprocessing import PreprocessSpec, dequantize
from pipeline.tflite.input_convention import file_convention
from pipeline.tflite.runtime import open_interpreter
from pipeline.tflite.sandboxed_load import load_untrusted
from pipeline.validation.parity_images import Feed, Images, ModelIO, model_io, prepare_images, runner_inputs
from pipeline.validation.validate import resolve_labels

REPORT_SCHEMA = 1
MAX_NAMED = 10  # images named in a one-line failure message (the report lists them all)

Progress = Callable[[int, int], None]
Step = Callable[[int], None]  # images done so far by one runtime


@dataclass
class Outputs:
    """One runtime's outputs for the whole feed."""

    scores: np.ndarray              # (N, classes) float32: the output, dequantized with its own scale
    raw: np.ndarray | None          # (N, classes) as the runtime gave it (integers for a quantized output); None
    runtime: str                    # e.g. "tflite_runtime 2.14.0"
    where: str                      # e.g. "this machine, in process", "device pi4 over ssh"
    fed: str                        # what the runtime was given
    decoding: dict | None = None    # a client that also decoded the files itself: how that changed its outputs


class Target(Protocol):
    name: str

    def run(self, feed: Feed, step: Step | None = None) -> Outputs: ...


# A target is built once the model's input and output are known, before any image is decoded, so a runtime
# that refuses the model says so first: (model path, its ModelIO) -> Target.
TargetFactory = Callable[[Path, ModelIO], Target]


@dataclass(frozen=True)
class Tolerance:
    """Parity fails on any changed top-1, and on output differences over these (when given)."""

    max_quanta: float | None = None   # quantized outputs
    max_abs: float | None = None      # float outputs

    def limit(self, quantized: bool) -> float | None:
        return self.max_quanta if quantized else self.max_abs


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


class LitertReference:
    """This machine's interpreter (ai-edge-litert, XNNPACK as everywhere in the tool): the side targets are judged by."""

    name = "this machine"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.model_bytes = load_untrusted(self.path)  # a corrupt file fails in a sandboxed child first
        self.interpreter = open_interpreter(self.model_bytes, name=str(self.path))
        self.io = model_io(self.interpreter, str(self.path))

    def run(self, feed: Feed, step: Step | None = None) -> Outputs:
        inp = self.interpreter.get_input_details()[0]["index"]
        out = self.interpreter.get_output_details()[0]["index"]
        raw = []
        for i in range(len(feed.tensor)):
            self.interpreter.set_tensor(inp, feed.tensor[i:i + 1])
            self.interpreter.invoke()
            raw.append(self.interpreter.get_tensor(out).reshape(-1).copy())
            if step:
                step(i + 1)
        raw_arr = np.stack(raw)
        return Outputs(dequantize(raw_arr, self.io.output.scale, self.io.output.zero_point), raw_arr,
                       f"ai_edge_litert {_dist_version('ai-edge-litert')}", "this machine, in process",
                       feed.convention)


def check_outputs(outputs: Outputs, n: int, classes: int, who: str) -> None:
    """A runtime must give one finite row of scores per image: anything else is an error, never a pass."""
    scores = np.asarray(outputs.scores)
    if scores.shape != (n, classes):
        raise ValidationError(f"{who} gave outputs of shape {list(scores.shape)}, expected [{n}, {classes}]")
    bad = ~np.isfinite(scores).all(axis=1)
    if bad.any():
        raise ValidationError(f"{who} gave NaN or infinite outputs for {int(bad.sum())} of {n} images")


def differences(io: ModelIO, ref: Outputs, tgt: Outputs) -> np.ndarray:
    """Per image, the largest output difference: quanta for a quantized output (exact from the integers when the
    target gives them), absolute for a float one."""
    if not io.output.quantized:
        return np.abs(ref.scores.astype(np.float64) - tgt.scores.astype(np.float64)).max(axis=1)
    if ref.raw is not None and tgt.raw is not None and np.asarray(tgt.raw).dtype.kind in "iu":
        return np.abs(ref.raw.astype(np.int64) - np.asarray(tgt.raw).reshape(ref.raw.shape).astype(np.int64)).max(1)
    diff = np.abs(ref.scores.astype(np.float64) - tgt.scores.astype(np.float64)) / io.output.scale
    return diff.max(axis=1)


def margins(io: ModelIO, ref: Outputs) -> np.ndarray:
    """The reference's top-1 minus top-2, in the same unit as ``differences``: a flip within it is a near tie."""
    top2 = np.sort(ref.scores.astype(np.float64), axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    return margin / io.output.scale if io.output.quantized else margin


def unit_of(io: ModelIO) -> str:
    if io.output.quantized:
        return f"quanta (output scale {io.output.scale:.6g}, {io.output.dtype})"
    return f"absolute units ({io.output.dtype} output)"


def _number(value: float, quantized: bool):
    return round(float(value), 2) if quantized else float(f"{value:.3g}")


def compare_target(io: ModelIO, images: Images, names: list[str], ref: Outputs, tgt: Outputs, name: str,
                   tolerance: Tolerance) -> dict:
    """One target's section of the report: per image, top-1 of both and the largest difference."""
    ref_top, tgt_top = ref.scores.argmax(axis=1), tgt.scores.argmax(axis=1)
    diff, margin = differences(io, ref, tgt), margins(io, ref)
    limit, q = tolerance.limit(io.output.quantized), io.output.quantized
    rows = [{"path": path, "label": label, "reference": names[int(r)], "target": names[int(t)],
             "top1_match": bool(r == t), "max_diff": _number(d, q), "reference_margin": _number(m, q)}
            for path, label, r, t, d, m in zip(images.paths, images.labels, ref_top, tgt_top, diff, margin)]
    mismatched = [row["path"] for row in rows if not row["top1_match"]]
    # A top-1 can change only where the reference's margin is at most twice the difference (each side moves by
    # at most the difference): such a flip is a near tie, not a different model.
    near_ties = sum(1 for row, d, m in zip(rows, diff, margin) if not row["top1_match"] and m <= 2 * d)
    over = [] if limit is None else [row["path"] for row, d in zip(rows, diff) if d > limit]
    return {"name": name, "runtime": tgt.runtime, "where": tgt.where, "fed": tgt.fed, "images": len(rows),
            "top1_matches": len(rows) - len(mismatched), "top1_mismatches": len(mismatched),
            "mismatched": mismatched, "mismatches_near_ties": near_ties, "max_diff": _number(diff.max(), q), "mean_diff": _number(diff.mean(), q),
            "identical_outputs": int(np.sum(diff == 0)), "tolerance": limit, "over_tolerance": over,
            "passed": not mismatched and not over, "rows": rows, "decoding": tgt.decoding}


@dataclass
class ParityResult:
    report: dict
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def raise_for_parity(self, where: str | None = None) -> None:
        if self.failures:
            raise ParityFailed("parity failed: " + "; ".join(self.failures) + (f" (report: {where})" if where else ""))


def failure_line(section: dict) -> str | None:
    """One clause naming the images, for the exit-3 message."""
    parts = []
    over = f"difference over {section['tolerance']:g}" if section["tolerance"] is not None else ""
    for key, what in (("mismatched", "top-1 differs"), ("over_tolerance", over)):
        paths = section[key]
        if paths:
            named = ", ".join(Path(p).name for p in paths[:MAX_NAMED]) + (" ..." if len(paths) > MAX_NAMED else "")
            parts.append(f"{what} on {len(paths)} of {section['images']} images ({named})")
    return f"{section['name']}: " + " and ".join(parts) if parts else None


def _run_all(reference: LitertReference, feed: Feed, targets: list, progress: Progress | None, offset: int = 0):
    """Every runtime over the same feed, one after the other; (done, total) counts images over all runtimes."""
    n = len(feed.tensor)
    total = offset + n * (1 + len(targets))
    results = []
    for k, runtime in enumerate([reference, *targets]):
        def step(done, k=k):
            if progress:
                progress(offset + k * n + done, total)
        outputs = runtime.run(feed, step)
        check_outputs(outputs, n, reference.io.classes, runtime.name)
        step(n)
        results.append(outputs)
    return results[0], results[1:]


def run_parity(model, eval_dir, factories: list[TargetFactory], *, labels=None, limit: int | None = None,
               tolerance: Tolerance = Tolerance(), progress: Progress | None = None) -> ParityResult:
    """Run ``model`` on the eval images here and on every target; compare image by image.

    ``progress(done, total)`` counts decoded images, then images run by each runtime in turn.
    """
    if not factories:
        raise ValidationError("parity needs at least one target (a device profile, or MediaPipe)",
                              remedy=Remedy.PARITY_TARGET)
    model = Path(model)
    reference = LitertReference(model)
    io = reference.io
    targets = [make(model, io) for make in factories]
    runtimes = 1 + len(targets)

    def decoded(done, chosen):
        if progress:
            progress(done, chosen * (1 + runtimes))

    images = prepare_images(eval_dir, io.size, limit=limit, progress=decoded)
    names, labels_source = resolve_labels(labels, model, model, images.folders, io.classes)
    convention = file_convention(model, reference.model_bytes)[0]
    feed = replace(runner_inputs(io, images.pixels, convention), paths=tuple(images.paths))
    ref, outs = _run_all(reference, feed, targets, progress, offset=images.chosen)
    sections = [compare_target(io, images, names, ref, out, target.name, tolerance)
                for target, out in zip(targets, outs)]
    report = artifacts.base_manifest("parity")
    report.update({
        "schema": REPORT_SCHEMA,
        "model": {"path": str(model), "sha256": artifacts.sha256_bytes(reference.model_bytes),
                  "input": io.input.to_dict(), "output": io.output.to_dict()},
        "inputs": {"what": f"RGB images already at the model's input size ({io.size}x{io.size} px): decoded, "
                           "centre-cropped and resized once by xedge's preprocessing, the same pixels handed to "
                           "every runtime, so differences are the runtimes', not their decoders' or resizers'",
                   "convention": feed.convention, "preprocessing": PreprocessSpec(size=io.size).describe(),
                   "root": str(images.root.resolve()), "found": images.found, "limit": limit,
                   "used": len(images.paths), "labels_source": labels_source,
                   "skipped": [s.to_dict() for s in images.skipped]},
        "unit": unit_of(io),
        "reference": {"runtime": ref.runtime, "where": ref.where, "fed": ref.fed},
        "targets": sections,
    })
    failures = [line for line in map(failure_line, sections) if line]
    report["passed"] = not failures
    return ParityResult(report, failures)


__all__ = ["LitertReference", "Outputs", "ParityResult", "Target", "TargetFactory", "Tolerance", "run_parity"]

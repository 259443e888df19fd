"""The top-1 drop of candidate .tflite bytes against their float source, on eval images decoded once.

An accuracy-budget search measures dozens of candidates on the same images:
the images are decoded and the float model run once, each candidate's
outputs are kept by content (a model measured twice runs once), and a
stratified third of the images is held out of the search to judge the model
it chooses. The drop is computed by the same pieces as ``xedge validate``
(discovery, round-robin limit, preprocessing, label mapping,
``drift_metrics``).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.core.data import discover
from pipeline.core.errors import ValidationError
from pipeline.core.preprocessing import LEGACY_CONVENTION, PreprocessSpec, dequantize, model_input, quantize
from pipeline.tflite.input_convention import tensor_convention
from pipeline.tflite.runtime import open_interpreter
from pipeline.validation.metrics import drift_metrics, topk
from pipeline.validation.output_kind import tflite_output_kind
from pipeline.validation.predict import as_probabilities, default_workers, open_runner
from pipeline.validation.lanes import load_item
from pipeline.validation.validate import resolve_labels, select_round_robin

@dataclass(frozen=True)
class DropFigures:
    """Drift figures of one model on one part of the eval images, as the manifest's ``float_fallback`` has them."""

    top1_drop_pp: float
    top1_float: float | None
    top1_quant: float | None
    agreement: float
    kl_mean: float
    samples: int
    top1_drop_ci95_pp: tuple[float, float]
    mcnemar: dict

    def to_manifest(self) -> dict:
        return {**asdict(self), "top1_drop_ci95_pp": list(self.top1_drop_ci95_pp)}


HOLDOUT_MIN_PER_CLASS = 3  # a held-out third needs at least one image of every class


def holdout_split(labels: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """Search and held-out image indices: every third image of each class (its 3rd, 6th, ...) is held out.

    Stratified and deterministic (the order is the eval folder's, after
    the eval limit). When a class has fewer than ``HOLDOUT_MIN_PER_CLASS``
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
            raise ValidationError(f"the eval folder needs labeled images (one subfolder per class); {data} is flat")
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

    def measure(self, model_bytes: bytes, part: str = "search") -> DropFigures:
        """Drift figures on one part of the eval images: ``search`` (the default), ``heldout`` or ``all``."""

        rows = self.parts[part]
        if not len(rows):
            raise ValidationError(f"no {part} eval images: {self.holdout_note}")
        m = drift_metrics(self.all_reference[rows], self.outputs(model_bytes)[rows], self.all_labels[rows],
                          self.names)
        lo, hi = (round(v, 4) for v in m["top1_drop_ci95_pp"])
        return DropFigures(round(m["top1_drop_pp"], 4), m["top1_float"], m["top1_quant"], m["agreement"],
                           m["kl_mean"], m["samples"], (lo, hi), m["mcnemar"])


__all__ = ["HOLDOUT_MIN_PER_CLASS", "DropFigures", "DropMeter", "holdout_split"]

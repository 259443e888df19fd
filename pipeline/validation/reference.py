"""The reference side of a validation: which runner computes it, and the float .tflite it is compared through.

A Keras model run on CPU is several times slower than the same model as a
float32 .tflite under XNNPACK, and the reference's forward pass is most of a
validation's time. So a Keras reference is converted to float32 .tflite once,
in memory, and that runner is used where it agrees with Keras within float
tolerance on a sample of the run's own images (checked every run, and the
check reported); otherwise Keras runs and the report says why. It is
converted for the model's own input (no scaling folded in): folding the
[-1, 1] scaling into a padded stem approximates the pad, measured at 5e-4 in
probability on MobileNetV2, against 4e-6 unfolded (docs/validation.md).

The check runs once, before the images are predicted, not beside them: run
in a thread next to the float .tflite it gained nothing on 2 cores (both
want every core), and it would have to keep every batch answered before its
verdict. Its time is a one-time cost of the run, reported apart from the
images/s of the predicting phase.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.conversion.export import ConvertSettings, convert_bytes
from pipeline.core.errors import ConversionError, ValidationError
from pipeline.core.preprocessing import PIXEL_CONVENTIONS
from pipeline.validation.metrics import topk
from pipeline.validation.predict import TfliteRunner, as_probabilities

# The largest difference in any output probability at which the float .tflite stands in for Keras; float32
# kernels that differ only in summation order stay orders of magnitude below it.
REFERENCE_TOLERANCE = 1e-4
# Images of the run's first chunk both runners are compared on: a systematic difference (a folded pad) shows on
# any image; the Keras forward pass on them is the check's cost (about 1 s for MobileNetV2-160 on 2 cores).
REFERENCE_CHECK_SAMPLES = 16

TFLITE_RUNNER = "float32 .tflite (XNNPACK), converted from the reference in memory"
KERAS_RUNNER = "the reference model itself (Keras/SavedModel)"


def domain_of(convention: str) -> str:
    """The float input a convention feeds: pixel values, or [-1, 1]."""
    return "pixels" if convention in PIXEL_CONVENTIONS else "signed_unit"


def check_tolerance(tolerance: float) -> None:
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValidationError(f"the reference tolerance must be a number >= 0, got {tolerance}",
                              setting="reference_tolerance")


@dataclass(frozen=True)
class FloatModel:
    """A float .tflite of the reference, and how it was obtained (said in the report)."""

    model_bytes: bytes = field(repr=False)
    how: str
    domain: str


@dataclass(frozen=True)
class NoFloatModel:
    """Why there is no float .tflite to compare with: ``skipped`` (nothing compares) or ``failed``."""

    status: str
    reason: str

    def to_report(self) -> dict:
        return {"status": self.status, "reason": self.reason}


def float_reference(ref_runner, domain: str) -> FloatModel | NoFloatModel:
    """The float .tflite taking ``domain`` input whose outputs and tensors stand for the reference's."""
    if getattr(ref_runner, "model_bytes", None) is not None:
        if ref_runner.facts.input_dtype != "float32":
            return NoFloatModel("skipped", "the reference .tflite is not a float model")
        if domain_of(ref_runner.convention) != domain:
            return NoFloatModel("skipped", f"the reference .tflite takes {ref_runner.convention} input, the "
                                           f"candidate {domain}: no tensor compares")
        return FloatModel(ref_runner.model_bytes, "reference .tflite", domain)
    try:
        float_bytes = convert_bytes(ref_runner.source, ConvertSettings("float", input_convention=domain))
    except ConversionError as exc:
        return NoFloatModel("failed", f"the reference could not be converted to float .tflite: {exc}")
    folded = domain == "pixels" and domain_of(ref_runner.convention) != "pixels"
    return FloatModel(float_bytes, "reference converted to float32 .tflite in memory" + (
        ", its [-1, 1] scaling folded in as in the candidate" if folded else ""), domain)


@dataclass
class ReferenceCheck:
    """Whether the float .tflite stands in for the Keras reference: both run on the same sample images."""

    runner: str
    reason: str
    tolerance: float
    samples: int = 0
    max_abs_diff: float | None = None  # largest difference of any output probability
    top1_equal: int = 0  # sample images on which both give the same top-1 class
    passed: bool | None = None  # None: not checked (a .tflite reference, or no float .tflite to check)
    seconds: float = 0.0  # both runners on the sample

    def to_report(self) -> dict:
        return {"runner": self.runner, "reason": self.reason,
                "check": {"samples": self.samples, "max_abs_diff": self.max_abs_diff,
                          "top1_equal": self.top1_equal, "tolerance": self.tolerance, "passed": self.passed,
                          "seconds": round(self.seconds, 3)}}


class ReferenceRunner:
    """The reference's outputs, from the float .tflite where it passes the check on the run's first images
    (``check_on``), else from the reference model itself. Outputs are the reference's own kind (logits or
    probabilities)."""

    def __init__(self, model, float_model: FloatModel | NoFloatModel | None, *, workers: int,
                 tolerance: float = REFERENCE_TOLERANCE, samples: int = REFERENCE_CHECK_SAMPLES):
        check_tolerance(tolerance)
        self.model, self.output_kind, self.samples = model, model.output_kind, max(1, samples)
        self.facts, self.float_runner = model.facts, None
        self.chosen = model
        if isinstance(float_model, FloatModel):
            self.float_runner = TfliteRunner("float32 .tflite of the reference", workers=workers,
                                             converted=(float_model.model_bytes, (float_model.domain, float_model.how)))
            self.check = ReferenceCheck(KERAS_RUNNER, "not checked yet", tolerance)
        else:
            why = float_model.reason if float_model else "the reference is a .tflite: it runs as it is"
            self.check = ReferenceCheck(KERAS_RUNNER if float_model else "the reference .tflite", why, tolerance)

    def check_on(self, pixels: np.ndarray) -> None:
        """Compare both runners on the first ``samples`` of these images and choose the one that computes the
        reference from now on (nothing to compare: the model itself stays)."""
        if self.float_runner is None or not len(pixels):
            return
        sample, t0 = pixels[:self.samples], time.perf_counter()
        slow, fast = self.model.predict_pixels(sample), self.float_runner.predict_pixels(sample)
        self.check.seconds = time.perf_counter() - t0
        self._judge(slow, fast)

    @property
    def per_image(self) -> bool:
        return self.chosen.per_image

    def predict_one(self, pixels: np.ndarray) -> np.ndarray:
        return self.chosen.predict_one(pixels)

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """The reference's outputs from the runner ``check_on`` chose (the model itself before any check)."""
        return self.chosen.predict_pixels(pixels)

    def _judge(self, slow: np.ndarray, fast: np.ndarray) -> None:
        check = self.check
        check.samples, check.passed = len(slow), False
        if self.float_runner is None or self.float_runner.output_kind.probabilities != self.output_kind.probabilities:
            check.reason = "the float .tflite's output is not the same kind (logits or probabilities) as the model's"
            return
        p_slow = as_probabilities(slow, self.output_kind, "reference")
        p_fast = as_probabilities(fast, self.output_kind, "reference float .tflite")
        check.max_abs_diff = float(np.max(np.abs(p_slow - p_fast)))
        check.top1_equal = int(np.sum(topk(p_slow, 1)[:, 0] == topk(p_fast, 1)[:, 0]))
        check.passed = check.max_abs_diff < check.tolerance and check.top1_equal == check.samples
        if check.passed:
            self.chosen, check.runner = self.float_runner, TFLITE_RUNNER
            check.reason = (f"agrees with the reference model on {check.samples} images of this run: largest "
                            f"probability difference {check.max_abs_diff:.3g} < {check.tolerance:g}, same top-1")
        else:
            check.reason = (f"the float .tflite differs from the reference model on {check.samples} images of this "
                            f"run (largest probability difference {check.max_abs_diff:.3g}, tolerance "
                            f"{check.tolerance:g}; same top-1 on {check.top1_equal}): the reference model runs")

    def seconds_per_image(self, pixels: np.ndarray) -> float:
        return self.chosen.seconds_per_image(pixels)

    def close(self) -> None:
        if self.float_runner is not None:
            self.float_runner.close()


__all__ = ["KERAS_RUNNER", "REFERENCE_CHECK_SAMPLES", "REFERENCE_TOLERANCE", "TFLITE_RUNNER", "FloatModel",
           "NoFloatModel", "ReferenceCheck", "ReferenceRunner", "check_tolerance", "domain_of", "float_reference"]

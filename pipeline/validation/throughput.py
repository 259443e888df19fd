"""The machine's own floor for a validation's images per second, measured cheaply in the same run.

A validation does three things per image: decode it, run the reference,
run the candidate. Each, timed on one thread on a few of the run's images
with nothing else of the run going on, gives the per-image work; with one
such pipeline per core the machine cannot go faster than
``cores / (decode + reference + candidate)``. The report puts the run's
images/s beside it (docs/validation.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pipeline.core.data import Item
from pipeline.core.preprocessing import ImageError, PreprocessSpec, pixels_for

FLOOR_SAMPLES = 8  # images each part is timed on: a fraction of a second even for Xception-299


@dataclass(frozen=True)
class Floor:
    """Per-image times (ms) of the three parts of a validation, and the images/s they allow on ``cores``."""

    decode_ms: float
    reference_ms: float
    candidate_ms: float
    cores: int
    samples: int

    @property
    def images_per_s(self) -> float:
        per_image = self.decode_ms + self.reference_ms + self.candidate_ms
        return self.cores * 1000.0 / per_image if per_image > 0 else float("inf")

    def to_report(self, measured_images_per_s: float | None) -> dict:
        ratio = (measured_images_per_s / self.images_per_s
                 if measured_images_per_s and self.images_per_s not in (0, float("inf")) else None)
        return {"decode_ms": round(self.decode_ms, 3), "reference_ms": round(self.reference_ms, 3),
                "candidate_ms": round(self.candidate_ms, 3), "cores": self.cores, "samples": self.samples,
                "images_per_s": round(self.images_per_s, 1), "of_floor": round(ratio, 3) if ratio else None}


def measure_floor(items: list[Item], spec: PreprocessSpec, reference, candidate, cores: int) -> Floor | None:
    """Time each part on ``items`` (images the run decoded), one after the other; None when none decodes."""
    t0, pixels = time.perf_counter(), []
    for item in items[:FLOOR_SAMPLES]:
        try:
            pixels.append(pixels_for(item.path, spec))
        except ImageError:
            continue
    if not pixels:
        return None
    decode_s = (time.perf_counter() - t0) / len(pixels)
    batch = np.stack(pixels)
    return Floor(decode_s * 1e3, reference.seconds_per_image(batch) * 1e3,
                 candidate.seconds_per_image(batch) * 1e3, cores, len(pixels))


__all__ = ["FLOOR_SAMPLES", "Floor", "measure_floor"]

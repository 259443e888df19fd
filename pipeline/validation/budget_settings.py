"""What an accuracy-budget conversion is asked for: the budget, where it is measured, how far the search may go.

One frozen record, checked when it is made, so a request that cannot run
fails before anything is loaded and its rules live in one place (the CLI
only parses them).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.core.errors import ConversionError

# (all quantized, with fallback) .tflite paths -> latency figures; passed in: devices/ is not imported here
LatencyCheck = Callable[[Path, Path], dict]


@dataclass(frozen=True)
class BudgetSettings:
    """A top-1 drop budget and the eval images it is measured on.

    ``max_drop_pp``: the largest top-1 drop allowed, in percentage points.
    ``eval_dir``: labeled images (one subfolder per class); ``labels``: a
    labels.json naming the model's outputs, as in ``xedge validate``;
    ``eval_limit``: at most this many of them, taken round-robin over classes.
    ``max_float_layers``: the most layers kept out of the quantized model;
    ``candidates``: the ranked layers measured at each step;
    ``layer_samples``: the images the per-layer ranking runs on.
    ``holdout``: hold a stratified third of the images out of the search to
    judge its result. ``latency``: measures the fallback's latency cost.
    """

    max_drop_pp: float
    eval_dir: str | os.PathLike
    labels: str | os.PathLike | None = None
    eval_limit: int | None = None
    max_float_layers: int = 8
    candidates: int = 3
    layer_samples: int = 16
    holdout: bool = True
    latency: LatencyCheck | None = None

    def __post_init__(self):
        if not (isinstance(self.max_drop_pp, (int, float)) and math.isfinite(self.max_drop_pp)
                and self.max_drop_pp >= 0):
            raise ConversionError(f"the top-1 drop budget must be >= 0 percentage points, got {self.max_drop_pp}",
                                  setting="max_drop_pp")
        for name, least in (("max_float_layers", 0), ("candidates", 1), ("layer_samples", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise ConversionError(f"{name} must be an integer >= {least}, got {value!r}", setting=name)
        if self.eval_limit is not None and (not isinstance(self.eval_limit, int) or self.eval_limit < 1):
            raise ConversionError(f"eval_limit must be at least 1, got {self.eval_limit!r}", setting="eval_limit")

    def to_manifest(self) -> dict:
        """The request as the manifest's ``float_fallback`` records it."""
        return {"budget_top1_drop_pp": self.max_drop_pp, "max_float_layers": self.max_float_layers,
                "eval": {"folder": str(self.eval_dir), "limit": self.eval_limit}}


__all__ = ["BudgetSettings", "LatencyCheck"]

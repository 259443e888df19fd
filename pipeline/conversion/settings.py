"""What a conversion is asked to do: the five modes and their settings, checked once, and where the output goes.

Kept apart from the converter so that float fallback, the budget search and
the CLI can name settings without importing the conversion machinery.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

from pipeline.core.errors import ConversionError
from pipeline.core.preprocessing import INPUT_CONVENTIONS, PreprocessSpec

MODES = ("float", "dynamic", "fp16", "int8", "int16x8")
CALIBRATED_MODES = ("int8", "int16x8")

Progress = Callable[[int, int], None]


class Rounding(enum.StrEnum):
    """How an int8 model's weights are rounded: to the nearest level (the quantizer's), or learned per layer
    from the calibration data (``pipeline.tflite.weight_rounding``)."""

    NEAREST = "nearest"
    LEARNED = "learned"


class Ranges(enum.StrEnum):
    """How int8 activation ranges come from calibration: the min/max seen, or the clipping of least expected
    error per tensor (``pipeline.tflite.activation_ranges``)."""

    MINMAX = "minmax"
    MSE = "mse"


class Representative(Protocol):
    spec: PreprocessSpec

    def __len__(self) -> int: ...

    def batches(self): ...

    def to_manifest(self) -> dict: ...


@dataclass(frozen=True)
class ConvertSettings:
    mode: str
    float_io: bool = False
    allow_float_fallback: bool = False
    per_channel: bool = True
    trust_model_code: bool = False
    optimize: bool = True
    calibrator: str = "fast"  # "fast" (min/max under XNNPACK, up to 4 cores) or "stock" (the converter's own)
    float_layers: tuple[str, ...] = ()  # Keras layers kept out of the quantized graph (pipeline.conversion.float_fallback)
    fallback: str = "float"  # what float_layers compute in: "float", or "int16" (int8 only; spliced int16x8 ops)
    # What the model's input holds (pipeline.core.preprocessing); None: the default for this mode and model
    # (pipeline.conversion.convention_choice.resolve_convention: pixels where the scaling folds exactly).
    input_convention: str | None = None
    rounding: Rounding = Rounding.NEAREST  # int8 only: pipeline.conversion.int8_methods
    bias_correction: bool = False  # int8 only: the mean output shift folded into each bias (int8_methods)
    ranges: Ranges = Ranges.MINMAX  # int8 only: activation ranges from calibration

    def __post_init__(self):
        object.__setattr__(self, "float_layers", tuple(str(name) for name in self.float_layers))
        if self.rounding not in tuple(Rounding):
            raise ConversionError(f"unknown rounding {self.rounding!r}; choose one of {', '.join(Rounding)}")
        object.__setattr__(self, "rounding", Rounding(self.rounding))
        if self.ranges not in tuple(Ranges):
            raise ConversionError(f"unknown ranges {self.ranges!r}; choose one of {', '.join(Ranges)}")
        object.__setattr__(self, "ranges", Ranges(self.ranges))
        if self.mode != "int8" and (self.int8_methods or self.ranges != Ranges.MINMAX):
            raise ConversionError(f"learned rounding, bias correction and error-chosen ranges are int8 methods: "
                                  f"they apply to int8, not {self.mode}")
        if self.float_layers and self.mode not in CALIBRATED_MODES:
            raise ConversionError(f"float layers only apply to int8 and int16x8, not {self.mode}")
        if self.fallback not in ("float", "int16"):
            raise ConversionError(f"unknown fallback {self.fallback!r}; choose float or int16")
        if self.fallback == "int16" and self.mode != "int8":
            raise ConversionError(f"--fallback int16 keeps layers of an int8 model in int16: it applies to --int8, "
                                  f"not --{self.mode}")
        if self.mode not in MODES:
            raise ConversionError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.calibrator not in ("fast", "stock"):
            raise ConversionError(f"unknown calibrator {self.calibrator!r}; choose fast or stock")
        if self.input_convention is not None and self.input_convention not in INPUT_CONVENTIONS:
            raise ConversionError(f"unknown input convention {self.input_convention!r}; choose one of "
                                  f"{', '.join(INPUT_CONVENTIONS)}")
        if self.input_convention == "pixels_int8" and (self.mode != "int8" or self.float_io):
            raise ConversionError("the pixels_int8 input (int8 p - 128) is for --int8 models with integer I/O")

    @property
    def decided_convention(self) -> str:
        """The input convention once decided for a model (``convention_choice.resolved`` sets it)."""
        if self.input_convention is None:
            raise ConversionError("the input convention has not been decided for a model yet")
        return self.input_convention

    @property
    def int8_methods(self) -> bool:
        """Whether the converted int8 layers are refined from the calibration data after the quantizer."""
        return self.rounding != Rounding.NEAREST or self.bias_correction

    def to_dict(self) -> dict:
        found = asdict(self)
        found["rounding"], found["ranges"] = str(self.rounding), str(self.ranges)
        return found


def default_output(model_path: Path, mode: str) -> Path:
    """``runs/x/model.keras`` -> ``runs/x/model_int8.tflite``; a SavedModel folder gets a sibling file."""
    model_path = Path(model_path)
    if model_path.is_dir():
        return model_path.parent / f"{model_path.name}_{mode}.tflite"
    return model_path.with_name(f"{model_path.stem}_{mode}.tflite")

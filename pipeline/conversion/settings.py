"""What a conversion is asked to do: the five modes and their settings, a request's calibration images and
accuracy budget, and where the output goes.

Every rule between settings is checked here, when the settings or the request
are created, so that the CLI, the budget search, the sweep and Python callers
meet the same rules. Kept apart from the converter (and light to import: no
NumPy) so that float fallback, the budget search and the CLI can name
settings without importing the conversion machinery.
"""

from __future__ import annotations

import enum
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from pipeline.core.conventions import InputConvention
from pipeline.core.errors import ConversionError, Remedy, SettingsError

if TYPE_CHECKING:  # the CLI imports these choices for --help, without NumPy
    from pipeline.core.preprocessing import PreprocessSpec


class Mode(enum.StrEnum):
    """What a conversion produces: float32, dynamic-range (int8 weights), float16 weights, full integer int8, or
    int16 activations with int8 weights."""

    FLOAT = "float"
    DYNAMIC = "dynamic"
    FP16 = "fp16"
    INT8 = "int8"
    INT16X8 = "int16x8"


MODES = tuple(Mode)
CALIBRATED_MODES = (Mode.INT8, Mode.INT16X8)  # the modes whose activation ranges come from calibration images

class Progress(Protocol):
    """A long step's progress, ``done`` of ``total``; ``step`` names it (the calibration pass when left out):
    the int8 methods after the calibration report under their own names."""

    def __call__(self, done: int, total: int, step: str = ...) -> None: ...


class Calibrator(enum.StrEnum):
    """Who measures the activation ranges: min/max under XNNPACK on up to 4 cores, or the converter's own
    logging calibrator."""

    FAST = "fast"
    STOCK = "stock"


class Fallback(enum.StrEnum):
    """What the layers an accuracy budget keeps out of int8 compute in: float, or int16 activations
    (spliced from an int16x8 conversion)."""

    FLOAT = "float"
    INT16 = "int16"


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


def _member(kind: type[enum.StrEnum], value, setting: str):
    """``value`` as a member of ``kind``, or the usage error that names the setting and the choices."""
    try:
        return kind(value)
    except ValueError:
        raise SettingsError(f"unknown {setting.replace('_', ' ')} {value!r}; choose one of {', '.join(kind)}",
                            setting=setting) from None


class Representative(Protocol):
    spec: PreprocessSpec

    def __len__(self) -> int: ...

    def batches(self): ...

    def to_manifest(self) -> dict: ...


@dataclass(frozen=True)
class ConvertSettings:
    """The settings of one conversion, normalized to their types and checked against each other on creation,
    so that every caller (the CLI, the budget search, the sweep, Python users) meets the same rules."""

    mode: Mode | str  # a string ("int8") becomes its Mode on creation, as do the other closed sets below
    float_io: bool = False
    allow_float_fallback: bool = False
    per_channel: bool = True
    trust_model_code: bool = False
    optimize: bool = True
    calibrator: Calibrator = Calibrator.FAST
    float_layers: tuple[str, ...] = ()  # Keras layers kept out of the quantized graph (pipeline.conversion.float_fallback)
    fallback: Fallback = Fallback.FLOAT  # what float_layers compute in (int16: int8 only; spliced int16x8 ops)
    # What the model's input holds (pipeline.core.preprocessing); None: the default for this mode and model
    # (pipeline.conversion.convention_choice.resolve_convention: pixels where the scaling folds exactly).
    input_convention: InputConvention | str | None = None
    rounding: Rounding = Rounding.NEAREST  # int8 only: pipeline.conversion.int8_methods
    # int8 only: the mean output shift folded into each bias (int8_methods); None: the default, on where the
    # staged int8 route calibrates on images (``routes.methods_decided``), off elsewhere.
    bias_correction: bool | None = None
    ranges: Ranges = Ranges.MINMAX  # int8 only: activation ranges from calibration
    # int8 only: cross-layer equalization of the float model before calibration (pipeline.tflite.equalize)
    equalize: bool = False

    def __post_init__(self):
        if self.mode is None:
            raise SettingsError("no conversion mode given", remedy=Remedy.MODE)
        object.__setattr__(self, "float_layers", tuple(str(name) for name in self.float_layers))
        for name, kind in (("mode", Mode), ("calibrator", Calibrator), ("fallback", Fallback),
                           ("rounding", Rounding), ("ranges", Ranges)):
            object.__setattr__(self, name, _member(kind, getattr(self, name), name))
        if self.input_convention is not None:
            object.__setattr__(self, "input_convention",
                               _member(InputConvention, self.input_convention, "input_convention"))
        self._check_integer_only()
        self._check_input_convention()

    def _check_integer_only(self) -> None:
        """The settings that only an integer (calibrated) or only an int8 model can take."""
        mode = self.mode
        if self.float_io and mode not in CALIBRATED_MODES:
            raise SettingsError(f"float input and output apply to int8 and int16x8 models, not {mode}",
                                setting="float_io")
        int8_methods = (("rounding", self.rounding != Rounding.NEAREST), ("ranges", self.ranges != Ranges.MINMAX),
                        ("bias_correction", self.bias_correction))
        for setting, asked in int8_methods:
            if asked and mode != Mode.INT8:
                raise SettingsError(f"learned rounding, bias correction and error-chosen ranges are int8 methods: "
                                    f"they apply to int8, not {mode}", setting=setting)
        if self.equalize and mode != Mode.INT8:
            raise SettingsError(f"cross-layer equalization rescales the float model int8 calibrates: it applies to "
                                f"int8, not {mode}", setting="equalize")
        if self.float_layers and mode not in CALIBRATED_MODES:
            raise SettingsError(f"float layers only apply to int8 and int16x8, not {mode}", setting="float_layers")
        if self.fallback == Fallback.INT16 and mode != Mode.INT8:
            raise SettingsError(f"an int16 fallback keeps layers of an int8 model in int16: it applies to int8, "
                                f"not {mode}", setting="fallback")

    def _check_input_convention(self) -> None:
        convention = self.input_convention
        if convention == InputConvention.PIXELS_INT8 and (self.mode != Mode.INT8 or self.float_io):
            raise SettingsError("the pixels-int8 input (int8 p - 128) is for int8 models with integer input and "
                                "output", setting="input_convention")

    @property
    def decided_convention(self) -> str:
        """The input convention once decided for a model (``convention_choice.resolved`` sets it)."""
        if self.input_convention is None:
            raise ConversionError("the input convention has not been decided for a model yet")
        return self.input_convention

    @property
    def int8_methods(self) -> bool:
        """Whether the converted int8 layers are refined from the calibration data after the quantizer."""
        return self.rounding != Rounding.NEAREST or bool(self.bias_correction)

    def to_dict(self) -> dict:
        """The settings as plain JSON values (the enums as their strings), for manifests."""
        found = asdict(self)
        for name, value in found.items():
            if isinstance(value, enum.StrEnum):
                found[name] = str(value)
        return found


@dataclass(frozen=True)
class ConvertRequest:
    """One conversion as asked for: its settings, the calibration images given (a folder), and an optional
    accuracy budget (the largest top-1 drop, in percentage points, on the labeled images of ``eval_dir``).

    The rules between these are checked here, on creation, and nowhere else: a front end builds a request and
    reports the ``SettingsError`` it raises, naming the setting at fault.
    """

    settings: ConvertSettings
    calib: str | os.PathLike | None = None
    max_drop_pp: float | None = None
    eval_dir: str | os.PathLike | None = None
    labels: str | os.PathLike | None = None  # a labels.json naming eval_dir's classes in output order
    max_float_layers: int = 8

    def __post_init__(self):
        mode = self.settings.mode
        if self.calib is not None and mode not in CALIBRATED_MODES:
            raise SettingsError(f"calibration images are only used by int8 and int16x8, not {mode}",
                                setting="calib")
        if self.max_drop_pp is not None and self.eval_dir is None:
            raise SettingsError("an accuracy budget is measured on labeled eval images; none given",
                                setting="eval_dir")
        if self.eval_dir is not None and self.max_drop_pp is None:
            raise SettingsError("eval images are only used to hold an accuracy budget; none given",
                                setting="max_drop_pp")
        if self.labels is not None and self.eval_dir is None:
            raise SettingsError("labels name the classes of the eval images; they go with an accuracy budget",
                                setting="labels")
        if self.budgeted and mode not in CALIBRATED_MODES:
            raise SettingsError(f"an accuracy budget applies to int8 and int16x8, not {mode}", setting="max_drop_pp")
        # the budget's own values (a drop >= 0, layer counts) are BudgetSettings' rules, in the validation stage
        settings = self.settings
        if settings.input_convention == InputConvention.PIXELS and mode == Mode.INT16X8 and not settings.float_io:
            # asked for, not decided: an int16 fallback's int16x8 donor may take pixels (only its layers are used)
            raise SettingsError("an int16x8 model has int16 or float32 input: pixel input needs float input and "
                                "output", setting="input_convention")
        if self.settings.fallback != Fallback.FLOAT and not self.budgeted:
            raise SettingsError("a fallback keeps the layers an accuracy budget chooses: it needs a budget",
                                setting="fallback")

    @property
    def budgeted(self) -> bool:
        return self.max_drop_pp is not None

    def needs_tensorflow(self, model_path: str | os.PathLike) -> bool:
        """Whether this conversion imports TensorFlow: quantizing a float .tflite to int8 needs only LiteRT and
        the quantizer extension, loaded by path (``pipeline.conversion.converter_hooks``); a budget search and
        every other source convert through TensorFlow."""
        tflite_only = Path(model_path).suffix.lower() == ".tflite" and self.settings.mode == Mode.INT8
        return not (tflite_only and not self.budgeted)


def default_output(model_path: Path, mode: str) -> Path:
    """``runs/x/model.keras`` -> ``runs/x/model_int8.tflite``; a SavedModel folder gets a sibling file."""
    model_path = Path(model_path)
    if model_path.is_dir():
        return model_path.parent / f"{model_path.name}_{mode}.tflite"
    return model_path.with_name(f"{model_path.stem}_{mode}.tflite")

"""The library's own exceptions.

The library raises these; only the CLI turns them into one-line messages and
exit codes. A message says what is wrong in the library's own words (setting
names as the Python API spells them, never a command-line flag); an error may
name the setting at fault and a :class:`Remedy`, which the CLI renders as the
flag that fixes it. So a Python caller reads no advice about flags it cannot
pass, and the CLI's advice lives in one table (``convert.py``).
"""

from __future__ import annotations

import enum


class Remedy(enum.StrEnum):
    """What a user can change to get past an error; the CLI words each as its flags."""

    FORCE = "force"  # overwrite the output, or choose another
    TRUST_CODE = "trust-code"  # load a model file that may run code
    CALIBRATION_IMAGES = "calibration-images"  # give a folder of representative images
    ALLOW_FLOAT_FALLBACK = "allow-float-fallback"  # accept float compute ops in an int8 model
    SIGNED_UNIT_INPUT = "signed-unit-input"  # keep the [-1, 1] input convention
    LABELS = "labels"  # give the class names in output order
    ANOTHER_OUTPUT = "another-output"  # the output folder holds something else
    INT8_PIXELS = "int8-pixels"  # a pixel input MediaPipe accepts
    PARITY_TARGET = "parity-target"  # name a runtime to compare with
    MODE = "mode"  # choose what to convert to
    MODEL_PATH = "model-path"  # name the model, or train one first
    SAME_ARCHITECTURE = "same-architecture"  # weights saved from an Xception of the same shape
    MODEL_FILES = "model-files"  # name the model files to test


class XedgeError(Exception):
    """Base class: a user-facing problem (bad input, bad settings), not a bug.

    ``setting`` names the settings field at fault (``"lr"``, ``"calib"``) and
    ``remedy`` what would fix it; both are optional and only shape the CLI's
    message.
    """

    exit_code = 2

    def __init__(self, message: str = "", *, setting: str | None = None, remedy: Remedy | None = None):
        super().__init__(message)
        self.setting = setting
        self.remedy = remedy


class DataError(XedgeError):
    """An image folder or data file is missing, empty or unusable."""


class CalibrationError(XedgeError):
    """The representative dataset cannot be built or is not representative."""


class ModelLoadError(XedgeError):
    """A model file is missing, malformed, or unsafe to load."""


class ConversionError(XedgeError):
    """TFLite conversion failed or produced a model that breaks the requested contract."""


class SettingsError(ConversionError):
    """Conversion settings that cannot go together or that the mode cannot take: a usage error, found before
    any work (the CLI prints it with its usage line)."""


class OutputExistsError(XedgeError):
    """An output exists and --force was not given."""


class ArtifactError(XedgeError):
    """An artifact could not be written (disk full, read-only folder, size limit)."""


class TrainingError(XedgeError):
    """Training cannot start or resume with the given settings."""


class TrainingInterrupted(TrainingError):
    """A signal stopped training after a checkpoint was saved; the same command resumes.

    The exit code is the shell's for the signal (130 for SIGINT, 143 for SIGTERM),
    so job schedulers see a preempted job, not a failed one.
    """

    def __init__(self, message: str, exit_code: int = 143):
        super().__init__(message)
        self.exit_code = exit_code


class ValidationError(XedgeError):
    """Drift validation cannot give a trustworthy answer (NaN outputs, no usable images, mismatched models)."""


class DeviceError(XedgeError):
    """A device cannot be reached or used: unknown profile, ssh/adb failure, runner error on the device."""


class BudgetExceeded(XedgeError):
    """A measured figure (accuracy drop, latency) is outside its budget.

    Distinct exit code so CI can tell "the model got worse" from "the tool broke".
    """

    exit_code = 3


class BudgetNotReached(BudgetExceeded):
    """``convert --max-drop``: no model within the accuracy budget using the allowed float layers.

    A budget miss (exit 3) rather than a conversion error: the tool worked and
    kept its best attempt under a distinct name; the model cannot meet the budget.
    """


class ParityFailed(BudgetExceeded):
    """``xedge parity``: a target runtime disagrees with this machine's interpreter on the same inputs.

    Exit 3 like a budget: the tool worked and measured a difference (a top-1
    that changed, or an output difference over ``--max-quanta``/``--max-abs``).
    """

"""The library's own exceptions.

The library raises these; only the CLI turns them into one-line messages and
exit codes. Each message says what is wrong and, where it can, how to fix it.
"""

from __future__ import annotations


class XedgeError(Exception):
    """Base class: a user-facing problem (bad input, bad settings), not a bug."""

    exit_code = 2


class DataError(XedgeError):
    """An image folder or data file is missing, empty or unusable."""


class CalibrationError(XedgeError):
    """The representative dataset cannot be built or is not representative."""


class ModelLoadError(XedgeError):
    """A model file is missing, malformed, or unsafe to load."""


class ConversionError(XedgeError):
    """TFLite conversion failed or produced a model that breaks the requested contract."""


class OutputExistsError(XedgeError):
    """An output exists and --force was not given."""


class ArtifactError(XedgeError):
    """An artifact could not be written (disk full, read-only folder, size limit)."""


class TrainingError(XedgeError):
    """Training cannot start or resume with the given settings."""


class BudgetExceeded(XedgeError):
    """A measured figure (accuracy drop, latency) is outside its budget.

    Distinct exit code so CI can tell "the model got worse" from "the tool broke".
    """

    exit_code = 3

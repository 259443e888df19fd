"""The xception-edge library, one package per stage of the pipeline.

Stages, from the bottom up; a module imports only from its own stage and the
stages listed before it (``tests/test_architecture.py`` enforces this):

    core         shared plumbing: errors, manifests and atomic writes, the one
                 preprocessing definition, image folders, the digits data,
                 quiet TensorFlow logs
    tflite       the .tflite file itself, without TensorFlow: flatbuffer access,
                 what a model holds, its metadata and input convention, the
                 sandboxed loader, the interpreter with its XNNPACK fallback,
                 graph rewrites, splicing
    model        the Keras model and its training: the Xception builder, the
                 tf_keras twin, loading users' models, pretrained weights, the
                 training loop, quantization-aware training, folding the input
                 scaling into the stem
    conversion   Keras/SavedModel -> .tflite: settings, the input convention a
                 model gets, the staged converter and TensorFlow's private
                 converter API, float fallback, export
    validation   running models and judging them: runners, drift metrics,
                 per-layer error, accuracy budgets, reports, diff, sweep,
                 parity with other runtimes (a device, MediaPipe)

``demo`` runs them all on the digits and so sits on top. Outside ``pipeline/``,
``calibrate/`` and ``devices/`` may import any stage; ``convert.py`` (the CLI)
imports everything; ``devices/runner.py`` imports nothing from the project,
since it is copied to devices on its own.

The entry points Python users call are importable from here (the README's
Python section): ``convert`` (``export_tflite``) with ``ConvertSettings``,
``validate`` with ``Budgets``, ``parity`` (``run_parity``) with ``Tolerance``,
``train`` with ``TrainConfig``, and ``PreprocessSpec`` (what a calibration set
is decoded to). Each is the library's own function, loaded
from its stage on first use: every ``import pipeline.x`` runs this file first,
so it imports nothing itself (no NumPy, no TensorFlow).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and editors see; at run time ``__getattr__`` loads them on first use
    from pipeline.conversion.export import export_tflite as convert
    from pipeline.conversion.settings import ConvertSettings
    from pipeline.core.preprocessing import PreprocessSpec
    from pipeline.model.train import TrainConfig, train
    from pipeline.validation.parity import Tolerance
    from pipeline.validation.parity import run_parity as parity
    from pipeline.validation.validate import Budgets, validate

__all__ = ["Budgets", "ConvertSettings", "PreprocessSpec", "Tolerance", "TrainConfig", "convert", "parity", "train",
           "validate"]


def __getattr__(name: str):
    """``pipeline.convert`` and the other entry points, imported from their stage when first asked for."""
    if name in ("convert", "ConvertSettings"):
        from pipeline.conversion.export import export_tflite
        from pipeline.conversion.settings import ConvertSettings

        found: dict[str, object] = {"convert": export_tflite, "ConvertSettings": ConvertSettings}
    elif name in ("validate", "Budgets"):
        from pipeline.validation.validate import Budgets, validate

        found = {"validate": validate, "Budgets": Budgets}
    elif name in ("parity", "Tolerance"):
        from pipeline.validation.parity import Tolerance, run_parity

        found = {"parity": run_parity, "Tolerance": Tolerance}
    elif name == "PreprocessSpec":
        from pipeline.core.preprocessing import PreprocessSpec

        found = {"PreprocessSpec": PreprocessSpec}
    elif name in ("train", "TrainConfig"):
        from pipeline.model.train import TrainConfig, train

        found = {"train": train, "TrainConfig": TrainConfig}
    else:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    globals().update(found)  # later lookups skip this function
    return found[name]

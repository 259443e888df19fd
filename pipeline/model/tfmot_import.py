"""Importing tensorflow-model-optimization without changing the process's Keras.

tfmot 0.8.1 sets ``TF_USE_LEGACY_KERAS=1`` in ``os.environ`` when imported
(``tfmot/python/core/keras/compat.py``) and then uses tf_keras whenever
``tf.keras`` is Keras 3. This project uses Keras 3 (``import keras``)
everywhere else, and subprocesses started later (tests, device runs) must
not inherit the variable, so it is put back as it was.
"""

from __future__ import annotations

import os


def import_tfmot():
    previous = os.environ.get("TF_USE_LEGACY_KERAS")
    try:
        import tensorflow_model_optimization as tfmot
    finally:
        if previous is None:
            os.environ.pop("TF_USE_LEGACY_KERAS", None)
        else:
            os.environ["TF_USE_LEGACY_KERAS"] = previous
    return tfmot

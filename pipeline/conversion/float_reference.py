"""The float source model's own outputs: the reference a graph rewrite is checked against.

Run as the source is (the Keras model itself, a SavedModel's signature, a
float .tflite's interpreter), so a rewrite of the quantized model is judged
against the model the user brought, not against another conversion of it.
"""

from __future__ import annotations

import numpy as np

from pipeline.conversion.routes import float_tflite
from pipeline.model.modelio import SourceModel
from pipeline.tflite.runtime import run_batch


def float_outputs(source: SourceModel, inputs: np.ndarray) -> np.ndarray:
    """The float source model's outputs (probabilities) for a batch of preprocessed inputs."""
    # Small batches: a 299x299 Xception holds about 300 MB of activations per image.
    chunks = [inputs[i:i + 4] for i in range(0, len(inputs), 4)]
    if source.model is not None:
        return np.concatenate([np.asarray(source.model(c, training=False), dtype=np.float32) for c in chunks])
    if source.kind == "tflite":
        return run_batch(float_tflite(source), inputs)[0]
    import tensorflow as tf

    signature = tf.saved_model.load(str(source.path)).signatures["serving_default"]
    return np.concatenate([np.asarray(next(iter(signature(tf.constant(c)).values())), dtype=np.float32)
                           for c in chunks])

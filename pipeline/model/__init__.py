"""The Keras model and its training: Xception, its tf_keras twin, users' models (nested ones inlined), pretrained
weights, training, QAT, and folding the input scaling into the stem.

May import: ``pipeline.core``, ``pipeline.tflite``.
"""

from pipeline.model.xception import XceptionConfig, build_xception

__all__ = ["XceptionConfig", "build_xception"]

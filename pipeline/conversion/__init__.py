"""Keras, SavedModel or float .tflite to .tflite in five modes: settings, the input convention a model gets, the
staged converter, float fallback, the int8 methods run after calibration and the quantizer, export.

Every private name of TensorFlow read here (the calibrator, the MLIR
quantizer, freezing, the per-tensor switch) is read in ``converter_hooks``,
behind one version pin, with the stock path as the fallback
(``tests/test_architecture.py`` checks that no other module reads one).

May import: ``pipeline.core``, ``pipeline.tflite``, ``pipeline.model``.
"""

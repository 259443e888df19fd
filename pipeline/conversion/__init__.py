"""Keras or SavedModel to .tflite in five modes: settings, the input convention a model gets, the staged converter,
float fallback, the int8 methods run after calibration and the quantizer, export.

Everything that touches TensorFlow's private converter API lives in
``converter_hooks`` behind one version pin.

May import: ``pipeline.core``, ``pipeline.tflite``, ``pipeline.model``.
"""

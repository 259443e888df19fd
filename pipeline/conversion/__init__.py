"""Keras, SavedModel or float .tflite to .tflite in five modes: settings, the input convention a model gets
(``convention_choice``), the converter routes and the staged converter (``routes``, ``converter_hooks``), float
fallback, the int8 methods run after calibration and the quantizer, the graph rewrites' gate and the float
reference it checks against (``rewrite_gate``, ``float_reference``), the manifest and metadata
(``conversion_manifest``), and the export that runs them in order (``export``).

Every private name of TensorFlow read here (the calibrator, the MLIR
quantizer, freezing, the per-tensor switch) is read in ``converter_hooks``,
behind one version pin, with the stock path as the fallback
(``tests/test_architecture.py`` checks that no other module reads one).

May import: ``pipeline.core``, ``pipeline.tflite``, ``pipeline.model``.
"""

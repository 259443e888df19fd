"""The .tflite file itself: flatbuffer access, inspection, metadata, the input convention it takes, the sandboxed
loader, the interpreter, rewrites, splicing, and the int8 methods that rewrite a quantized model's constants and
a calibrated model's ranges (learned rounding, bias correction, error-chosen ranges).

Nothing here imports TensorFlow's Python package (``tests/test_architecture.py``
checks it): a float .tflite can be inspected, checked, rewritten, spliced and
run with LiteRT alone. LiteRT's one private name in use, its per-node view, is
read in ``runtime`` behind a version pin, with the flatbuffer's own ops as the
fallback.

May import: ``pipeline.core``.
"""

"""The .tflite file itself: flatbuffer access, inspection, metadata, the input convention it takes, the sandboxed
loader, the interpreter, rewrites, splicing, and the int8 methods that rewrite a quantized model's constants and
a calibrated model's ranges (learned rounding, bias correction, error-chosen ranges).

Nothing here imports TensorFlow's Python package: a float .tflite can be
inspected, checked, rewritten and run with LiteRT alone.

May import: ``pipeline.core``.
"""

"""Deprecated import path: this module is now :mod:`pipeline.tflite.sandboxed_load`.

Kept so that imports written against the old name keep working; new code
imports ``pipeline.tflite.sandboxed_load``.
"""

from pipeline.tflite.sandboxed_load import *  # noqa: F401,F403

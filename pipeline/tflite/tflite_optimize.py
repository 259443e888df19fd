"""Deprecated import path: this module is now :mod:`pipeline.tflite.rewrites`.

Kept so that imports written against the old name keep working; new code
imports ``pipeline.tflite.rewrites``.
"""

from pipeline.tflite.rewrites import *  # noqa: F401,F403

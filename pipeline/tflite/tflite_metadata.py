"""Deprecated import path: this module is now :mod:`pipeline.tflite.metadata`.

Kept so that imports written against the old name keep working; new code
imports ``pipeline.tflite.metadata``.
"""

from pipeline.tflite.metadata import *  # noqa: F401,F403

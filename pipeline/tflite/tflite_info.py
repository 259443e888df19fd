"""Deprecated import path: this module is now :mod:`pipeline.tflite.contents`.

Kept so that imports written against the old name keep working; new code
imports ``pipeline.tflite.contents``.
"""

from pipeline.tflite.contents import *  # noqa: F401,F403

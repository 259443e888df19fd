"""Deprecated import path: this module is now :mod:`pipeline.model.steps`.

Kept so that imports written against the old name keep working; new code
imports ``pipeline.model.steps``.
"""

from pipeline.model.steps import *  # noqa: F401,F403

"""Deprecated import path: this module is now :mod:`pipeline.core.tf_logs`.

Kept so that imports written against the old name keep working; new code
imports ``pipeline.core.tf_logs``.
"""

from pipeline.core.tf_logs import *  # noqa: F401,F403

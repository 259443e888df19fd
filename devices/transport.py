"""Deprecated import path: this module is now :mod:`devices.transport_base`.

Kept so that imports written against the old name keep working; new code
imports ``devices.transport_base``.
"""

from devices.transport_base import *  # noqa: F401,F403

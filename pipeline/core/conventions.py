"""The input conventions a converted model's input may hold: a closed set.

Apart from ``preprocessing`` (which imports NumPy and Pillow), so that the
command line can offer the choices without importing either.
"""

from __future__ import annotations

import enum


class InputConvention(enum.StrEnum):
    """What a converted model's input holds: raw pixels (uint8 0..255, or float32 0..255 on a float input),
    int8 pixels p - 128, or [-1, 1] (p / 127.5 - 1). The names are also accepted with hyphens
    (``"pixels-int8"``), the spelling of prose and of command lines."""

    PIXELS = "pixels"
    PIXELS_INT8 = "pixels_int8"
    SIGNED_UNIT = "signed_unit"

    @classmethod
    def _missing_(cls, value):
        if isinstance(value, str) and "-" in value:
            return cls.__members__.get(value.upper().replace("-", "_"))
        return None

    @property
    def spelled(self) -> str:
        """The name with hyphens (``pixels-int8``)."""
        return self.value.replace("_", "-")

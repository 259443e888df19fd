"""A device profile's ``transport`` name -> the class that reaches that device.

Kept apart from ``devices.transport_base`` (what every transport shares) so that the
transports import the shared part and this table imports the transports:
dependencies point one way.
"""

from __future__ import annotations

from devices.adb import AdbTransport
from devices.local import LocalTransport
from devices.ssh import SshTransport

TRANSPORTS: dict[str, type] = {"local": LocalTransport, "ssh": SshTransport, "adb": AdbTransport}


def get_transport(profile):
    """An instance of the profile's transport (``devices.profile`` checks the name against ``TRANSPORTS`` when it loads a profile)."""
    return TRANSPORTS[profile.transport](profile)

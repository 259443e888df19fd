"""Latency on the device: the standalone runner, its transports (local, ssh, adb), profiles and budgets.

``devices/arm64/`` builds and runs an emulated aarch64 board, reached as a
local profile with an exec prefix (``arm64-emulated``).
"""

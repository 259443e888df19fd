"""Latency on the device: the standalone runner, its transports (local, ssh, adb), profiles and budgets."""

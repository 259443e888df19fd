"""pytest's project-wide options: ``pytest devices --device NAME`` runs the on-device latency tests.

The tests themselves live in ``tests/devices/latency/`` (not in the installed
``devices`` package); this file, loaded for any pytest run in the project,
registers their options and lets the documented ``pytest devices`` keep
pointing at them.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
LATENCY_TESTS = ROOT / "tests" / "devices" / "latency"


def pytest_addoption(parser):
    group = parser.getgroup("xedge devices")
    group.addoption("--device", help="device profile (name or .toml path) whose latency budgets to test")
    group.addoption("--model", action="append", default=[], help="a .tflite to test (repeatable); default: "
                    "each budget's path in the profile")
    group.addoption("--runs", type=int, default=None, help="timed runs per model (default: the profile's)")


def pytest_configure(config):
    """``pytest devices`` (the folder of the device code) means its latency tests."""
    config.args[:] = [str(LATENCY_TESTS) if Path(arg).resolve() == ROOT / "devices" else arg for arg in config.args]

"""``pytest devices --device NAME``: the on-device latency tests as a pytest run.

Loaded only when pytest is pointed at this folder (the default testpaths is
``tests``), so the project's own suite is unaffected. One test per model with
a budget in the profile; ``--junitxml`` gives CI its report.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("xedge devices")
    group.addoption("--device", help="device profile (name or .toml path) whose latency budgets to test")
    group.addoption("--model", action="append", default=[], help="a .tflite to test (repeatable); default: "
                    "each budget's path in the profile")
    group.addoption("--runs", type=int, default=None, help="timed runs per model (default: the profile's)")


def pytest_generate_tests(metafunc):
    if "latency_case" not in metafunc.fixturenames:
        return
    name = metafunc.config.getoption("--device")
    if not name:
        metafunc.parametrize("latency_case", [pytest.param(None, marks=pytest.mark.skip(
            reason="pass --device NAME (a device profile) to run the latency tests"))])
        return
    from devices.latency import select_cases
    from devices.profile import load_profile

    profile = load_profile(name)
    cases, _ = select_cases(profile, metafunc.config.getoption("--model") or None)
    metafunc.parametrize("latency_case", [(profile, c) for c in cases], ids=[c.name for c in cases])

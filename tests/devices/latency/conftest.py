"""``pytest devices --device NAME``: the on-device latency tests as a pytest run.

One test per model with a budget in the profile; ``--junitxml`` gives CI its
report. Without ``--device`` (the project's own suite) the one test skips by
design. The options are registered in the project's root ``conftest.py``.
"""

from __future__ import annotations

import pytest


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

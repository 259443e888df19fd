"""One pytest test per budgeted model of ``--device``: its p50/p90 on the device within budget."""

from __future__ import annotations

import pytest


def test_latency_within_budget(latency_case, request):
    from devices.bench import bench
    from devices.latency import EMULATED_NOTE, check_budget

    profile, case = latency_case
    result = bench([case.model], profile, runs=request.config.getoption("--runs"))
    lat = result["latency_ms"]
    emulated = EMULATED_NOTE if profile.emulated else ""
    print(f"{case.name} on {profile.name}: p50 {lat['p50']} ms, p90 {lat['p90']} ms{emulated}")  # the JUnit's system-out
    broken = check_budget(result, case.budget)
    if broken:
        pytest.fail(f"{case.name} on {profile.name}: " + ", ".join(broken) + emulated, pytrace=False)

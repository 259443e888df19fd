"""On-device latency tests: every model with a budget in the profile, against its p50/p90.

The result is a JUnit XML (one testcase per model, which CI systems show
as tests) and a JSON summary with the full bench of each model. Whether an
exceeded budget stops anything is the caller's choice: the CLI raises
``BudgetExceeded`` (exit 3), the pytest entry fails the test. Against an
emulated profile every case, the table, the JUnit suite and the summary say
the times were emulated: such a budget only catches a model that got slower
under the same emulator.
"""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from devices.bench import bench
from devices.profile import Budget, DeviceProfile
from pipeline.core.artifacts import atomic_write_bytes, atomic_write_json, now_iso
from pipeline.core.errors import DeviceError, Remedy


@dataclass
class Case:
    name: str
    model: str
    budget: Budget
    status: str = "pending"           # passed, failed, error
    message: str = ""
    result: dict | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        lat = (self.result or {}).get("latency_ms") or {}
        return {"name": self.name, "model": self.model, "status": self.status, "message": self.message,
                "budget_ms": {"p50": self.budget.p50_ms, "p90": self.budget.p90_ms},
                "measured_ms": {"p50": lat.get("p50"), "p90": lat.get("p90")}, "bench": self.result}


@dataclass
class LatencyReport:
    device: str
    cases: list[Case] = field(default_factory=list)
    unbudgeted: list[str] = field(default_factory=list)
    created: str = field(default_factory=now_iso)
    emulated: bool = False            # the budgets were checked against an emulator's times, not a board's

    @property
    def failed(self) -> list[Case]:
        return [c for c in self.cases if c.status != "passed"]

    def to_dict(self) -> dict:
        return {"device": self.device, "emulated": self.emulated, "created": self.created, "passed": not self.failed,
                "cases": [c.to_dict() for c in self.cases], "models_without_budget": self.unbudgeted}

    def failure_message(self) -> str:
        return "; ".join(f"{c.name}: {c.message}" for c in self.failed) + (EMULATED_NOTE if self.emulated else "")


EMULATED_NOTE = " (emulated times: the emulator's speed, not the board's latency)"


def check_budget(result: dict, budget: Budget) -> list[str]:
    """The budget lines a bench result breaks (empty: within budget)."""
    lat = result.get("latency_ms") or {}
    broken = []
    for key, limit in (("p50", budget.p50_ms), ("p90", budget.p90_ms)):
        if limit is None:
            continue
        value = lat.get(key)
        if value is None:
            broken.append(f"{key} was not measured (budget {limit:g} ms)")
        elif value > limit:
            broken.append(f"{key} {value:.2f} ms > budget {limit:g} ms")
    return broken


def select_cases(profile: DeviceProfile, models: list[str | os.PathLike] | None) -> tuple[list[Case], list[str]]:
    """Cases for the given model files (matched to budgets by file stem), or for every budget's ``path``."""
    if not profile.budgets:
        raise DeviceError(f"device profile {profile.name} has no [budgets.MODEL] table; add p50_ms/p90_ms "
                          f"for each model name (file stem) to {profile.source}")
    if models:
        cases, unbudgeted = [], []
        for m in models:
            stem = Path(m).stem
            if stem in profile.budgets:
                cases.append(Case(stem, str(m), profile.budgets[stem]))
            else:
                unbudgeted.append(str(m))
        if not cases:
            raise DeviceError(f"none of the models has a budget in profile {profile.name} "
                              f"(budgets for: {', '.join(sorted(profile.budgets))}; a model matches by file stem)")
        return cases, unbudgeted
    missing = sorted(name for name, b in profile.budgets.items() if not b.path)
    if missing:
        raise DeviceError(f"profile {profile.name}'s budget {missing[0]} names no model: give a path in "
                          f"[budgets.{missing[0]}]", remedy=Remedy.MODEL_FILES)
    return [Case(name, b.path, b) for name, b in profile.budgets.items() if b.path], []  # every one has a path


def run_latency_tests(profile: DeviceProfile, models=None, *, runs: int | None = None, warmup: int | None = None,
                      progress=None) -> LatencyReport:
    cases, unbudgeted = select_cases(profile, models)
    report = LatencyReport(profile.name, cases, unbudgeted, emulated=profile.emulated)
    for i, case in enumerate(cases):
        start = time.perf_counter()
        try:
            case.result = bench([case.model], profile, runs=runs, warmup=warmup)
        except DeviceError as exc:
            case.status, case.message = "error", str(exc)
        else:
            broken = check_budget(case.result, case.budget)
            case.status, case.message = ("failed", ", ".join(broken)) if broken else ("passed", "")
            if profile.emulated:
                case.message = (case.message + EMULATED_NOTE).strip()
        case.seconds = time.perf_counter() - start
        if progress:
            progress(i + 1, len(cases))
    return report


def junit_xml(report: LatencyReport) -> bytes:
    kind = "emulated" if report.emulated else "latency"
    suite = ET.Element("testsuite", name=f"{kind}[{report.device}]", tests=str(len(report.cases)),
                       failures=str(sum(c.status == "failed" for c in report.cases)),
                       errors=str(sum(c.status == "error" for c in report.cases)), skipped="0",
                       timestamp=report.created,
                       time=f"{sum(c.seconds for c in report.cases):.3f}")
    for case in report.cases:
        el = ET.SubElement(suite, "testcase", classname=f"{kind}.{report.device}", name=case.name,
                           time=f"{case.seconds:.3f}")
        lat = (case.result or {}).get("latency_ms") or {}
        props = ET.SubElement(el, "properties")
        for key, value in (("p50_ms", lat.get("p50")), ("p90_ms", lat.get("p90")),
                           ("budget_p50_ms", case.budget.p50_ms), ("budget_p90_ms", case.budget.p90_ms),
                           ("model", case.model), ("emulated", "true" if report.emulated else None)):
            if value is not None:
                ET.SubElement(props, "property", name=key, value=str(value))
        if case.status == "failed":
            ET.SubElement(el, "failure", message=case.message, type="BudgetExceeded").text = case.message
        elif case.status == "error":
            ET.SubElement(el, "error", message=case.message, type="DeviceError").text = case.message
    ET.indent(suite)
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="utf-8") + b"\n"


def write_report(report: LatencyReport, out: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out)
    junit = atomic_write_bytes(out / "junit.xml", junit_xml(report))
    summary = atomic_write_json(out / "summary.json", report.to_dict())
    return junit, summary

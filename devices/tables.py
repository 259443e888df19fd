"""Terminal tables for bench and latency-test results (rich), kept out of the CLI module."""

from __future__ import annotations

from rich.table import Table


# Every output of an emulated profile says this: qemu translates each instruction, so a time there says how
# the emulator ran the model, not how the board would (docs/devices.md).
EMULATED = "EMULATED times (qemu-user), not latencies"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _runtime(r: dict) -> str:
    rt = r.get("runtime") or {}
    return f"{rt.get('name')} {rt.get('version') or ''}".strip()


def bench_table(results: list[dict], title: str) -> Table:
    """p50/p90/p99 and mean/std in ms; min, max and everything else are in the JSON."""
    table = Table(title=title)
    for col in ("model", "threads", "p50", "p90", "p99", "mean", "std", "init", "MiB"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        lat = r["latency_ms"]
        rss = r.get("peak_rss_mb")
        table.add_row((r.get("model") or {}).get("name", "?"), str(r.get("threads", "-")),
                      *(_fmt(lat.get(c)) for c in ("p50", "p90", "p99", "mean", "std")), _fmt(r.get("init_ms")),
                      "-" if rss is None else f"{rss:.0f}")
    return table


def describe_machine(r: dict) -> str:
    m = r.get("machine") or {}
    device = r.get("device") or {}
    inputs = (r.get("inputs") or {}).get("source", "?")
    xnnpack = "refused the model" if r.get("xnnpack_refused") else "on" if r.get("xnnpack", True) else "off"
    return (f"{device.get('name', '?')} ({device.get('transport', '?')}), {_runtime(r)}: {m.get('cpu') or '?'}, "
            f"{m.get('cpu_count') or '?'} cores, {m.get('machine') or '?'}; {r.get('runs')} runs after "
            f"{r.get('warmup')} warm-up, XNNPACK {xnnpack}, {inputs} inputs; "
            + (f"{EMULATED}, in ms" if device.get("emulated") else "latencies in ms"))


def time_title(profile) -> str:
    """A bench table's title: an emulated profile's times are never called latencies."""
    return f"{profile.name}: {EMULATED} (ms)" if profile.emulated else f"latency on {profile.name}"


def compare_table(result: dict) -> Table:
    c = result["compare"]
    table = Table(title=f"time of {c['b']} / {c['a']}, per pair, over {c['pairs']} alternating pairs")
    cols = ("p50", "p90", "min", "max", "mean", "std")
    table.add_column("where")
    for col in cols:
        table.add_column(col, justify="right")
    table.add_row(result.get("device", {}).get("name", "device"), *(f"{c['ratio_b_over_a'][k]:.3f}" for k in cols))
    ref = result.get("reference")
    if ref:
        table.add_row("build machine", *(f"{ref['ratio_b_over_a'][k]:.3f}" for k in cols), style="dim")
    return table


def latency_table(report) -> Table:
    table = Table(title=f"latency test on {report.device}" + (f": {EMULATED}" if report.emulated else ""))
    for col in ("model", "p50", "budget p50", "p90", "budget p90", "result"):
        table.add_column(col, justify="left" if col in ("model", "result") else "right")
    for case in report.cases:
        lat = (case.result or {}).get("latency_ms") or {}
        status = {"passed": "[green]pass[/green]", "failed": "[red]FAIL[/red]",
                  "error": "[red]ERROR[/red]"}[case.status]
        table.add_row(case.name, _fmt(lat.get("p50")), _fmt(case.budget.p50_ms), _fmt(lat.get("p90")),
                      _fmt(case.budget.p90_ms), status + (f" {case.message}" if case.message else ""))
    return table

"""Reading TFLite's native ``benchmark_model`` output into the runner's JSON shape.

On phones without Python, TFLite's own ``benchmark_model`` binary is the
runner. Its log is parsed here (format of ``benchmark_model.cc``:
``Stat::OutputToStream`` lines ``count=.. first=.. curr=.. min=.. max=..
avg=.. std=..``, with ``p5=.. median=.. p95=..`` in newer versions, and the
``Inference timings in us: Init: ..`` summary). The tool gives no p90 or p99:
``p90`` is filled from its p95, an upper bound, so a budget that passes on it
passes on the true p90 too; where it prints no percentiles at all they stay
``None`` and the result says which figures were measured.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.core.errors import DeviceError

_STAT = re.compile(r"count=(?P<count>\d+)\s+first=(?P<first>[\d.]+)\s+curr=(?P<curr>[\d.]+)\s+min=(?P<min>[\d.]+)"
                   r"\s+max=(?P<max>[\d.]+)\s+avg=(?P<avg>[\d.e+]+)\s+std=(?P<std>[\d.]+)"
                   r"(?:\s+p5=(?P<p5>[\d.]+)\s+median=(?P<median>[\d.]+)\s+p95=(?P<p95>[\d.]+))?")
_TIMINGS = re.compile(r"Inference timings in us: Init: (?P<init>[\d.]+), First inference: (?P<first>[\d.]+), "
                      r"Warmup \(avg\): (?P<warmup>[\d.e+]+), Inference \(avg\): (?P<avg>[\d.e+]+)")
_MEMORY = re.compile(r"(?:Peak memory footprint|Memory footprint delta from the start of the tool) \(MB\): "
                     r"init=(?P<init>[\d.]+) overall=(?P<overall>[\d.]+)")
_RUNTIME = re.compile(r"(?:TensorFlow Lite|LiteRT) version: (?P<v>\S+)|The TFLite runtime version: (?P<v2>\S+)")
_THREADS = re.compile(r"Num threads: \[(\d+)\]")
_XNNPACK = re.compile(r"Replacing (\d+) out of (\d+) node\(s\) with delegate \((\w+)\) node, yielding (\d+) partitions")


def _ms(us: str | None) -> float | None:
    return None if us is None else round(float(us) / 1000.0, 4)


def parse_benchmark_model(text: str) -> dict:
    """The runner's JSON fields from one benchmark_model log; DeviceError if it did not finish."""
    stats = [m.groupdict() for m in _STAT.finditer(text)]
    timings = _TIMINGS.search(text)
    if not stats or not timings:
        errors = [ln.split("ERROR:", 1)[1].strip() for ln in text.splitlines() if "ERROR:" in ln]
        # The first ERROR is the cause (an unsupported op version...); the last says where it stopped.
        reason = "; ".join(dict.fromkeys([errors[0], errors[-1]])) if errors else "no 'Inference timings' line"
        raise DeviceError(f"benchmark_model failed: {reason}")
    run = stats[-1]  # the warm-up's Stat line comes first, the timed runs' last
    latency = {"min": _ms(run["min"]), "p50": _ms(run["median"]), "p90": _ms(run["p95"]), "p99": None,
               "mean": _ms(run["avg"]), "max": _ms(run["max"]), "std": _ms(run["std"])}
    result: dict[str, Any] = {"schema": 1, "init_ms": _ms(timings["init"]), "latency_ms": latency, "runs": int(run["count"]),
              "warmup": int(stats[0]["count"]) if len(stats) > 1 else None,
              "first_inference_ms": _ms(timings["first"]),
              "runtime": {"name": "benchmark_model", "version": None},
              "latency_source": {"p50": "median" if run["median"] else None,
                                 "p90": "p95 (upper bound of p90)" if run["p95"] else None}}
    memory = _MEMORY.search(text)
    result["peak_rss_mb"] = float(memory["overall"]) if memory else None
    runtime = _RUNTIME.search(text)
    if runtime:
        result["runtime"]["version"] = runtime["v"] or runtime["v2"]
    threads = _THREADS.search(text)
    if threads:
        result["threads"] = int(threads.group(1))
    delegated = _XNNPACK.findall(text)
    if delegated:
        replaced, total, _, partitions = delegated[-1]
        result["ops"] = {"nodes": int(total), "delegated_nodes": int(replaced),
                         "delegate_partitions": int(partitions)}
    return result

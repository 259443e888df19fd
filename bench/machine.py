"""What a bench figure was measured on, so that every number in bench/results can be traced to a machine.

CPU model and flags that decide the int8 kernels (AVX-512 VNNI against AVX2),
the cores the process may use, the versions of everything in the measured
path, and the load average at the start and end of the run (a busy machine
gives slow figures that look like regressions).
"""

from __future__ import annotations

import os
import platform

from pipeline.core import artifacts

_VERSIONED = ("tensorflow", "ai-edge-litert", "numpy", "onnxruntime", "tf2onnx", "onnx", "xception-edge")
_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo ({} where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if info:
                        break
                    continue
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def describe(load_at_start: list[float] | None = None) -> dict:
    """The machine, its software and its load; ``load_at_start`` is ``load_average()`` taken before the run."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    versions = artifacts.versions(_VERSIONED)
    return {
        "cpu_model": info.get("model name") or info.get("Model") or platform.processor() or platform.machine(),
        "cpu_flags": sorted(flags.intersection(_FLAGS)),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "versions": versions,
        "load_average_1_5_15": {"start": load_at_start, "end": load_average()},
    }

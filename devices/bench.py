"""Benching models on a device: one model, an A/B comparison, or a thread sweep.

The CLI and the demo call these; each returns the runner's JSON enriched with
the device it ran on and, for comparisons, the notes of ``devices.diagnose``
that explain a surprising int8/float ratio.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from devices.diagnose import explain_pair
from devices.profile import DeviceProfile, load_profile
from devices.transport_base import BenchRequest
from devices.transports import get_transport
from pipeline.core.errors import DeviceError
from pipeline.tflite.input_convention import file_convention
from pipeline.tflite.sandboxed_load import check_manifest, probe, read_model_bytes

REFERENCE_RUNS = 20


def model_input_shape(model: Path) -> list[int]:
    """The model's first input shape, read by the sandboxed probe (an untrusted file cannot crash us)."""
    return [int(v) for v in _probe(str(model))["inputs"][0]["shape"]]


@functools.lru_cache(maxsize=16)
def _probe_cached(path: str, mtime_ns: int, size: int) -> dict:
    data = read_model_bytes(path)
    check_manifest(path, data)
    return probe(data, path)


def _probe(path: str) -> dict:
    st = Path(path).stat()
    return _probe_cached(path, st.st_mtime_ns, st.st_size)


def input_convention(model: Path) -> str:
    """The model's input convention, read here (``pipeline.tflite.input_convention``: its input tensor, metadata or
    manifest) and passed to the runner, which on a device sees neither the metadata reader nor the manifest."""
    return file_convention(model, read_model_bytes(str(model)))[0]


def _check_models(models) -> tuple[Path, ...]:
    """Every model must exist, match its manifest, and load and run once in a sandboxed child first."""
    paths = tuple(Path(m) for m in models)
    for p in paths:
        if not p.is_file():
            raise DeviceError(f"model {p} not found")
        _probe(str(p))
    return paths


def bench(models, profile: DeviceProfile | None = None, *, runs: int | None = None, warmup: int | None = None,
          threads: int | None = None, inputs: np.ndarray | None = None, outputs: Path | None = None,
          keep_times: bool = False, xnnpack: bool | None = None) -> dict:
    """Bench one model, or two alternating (``compare``), on ``profile`` (default: this machine)."""
    profile = profile or load_profile("local")
    _check_threads([threads] if threads is not None else [])
    paths = _check_models(models)
    with tempfile.TemporaryDirectory(prefix="xedge-bench-") as tmp:
        batch = None
        if inputs is not None:
            batch = Path(tmp) / "inputs.npy"
            dtype = np.uint8 if np.asarray(inputs).dtype == np.uint8 else np.float32  # pixels, or [-1, 1] inputs
            np.save(batch, np.ascontiguousarray(inputs, dtype=dtype), allow_pickle=False)
        request = BenchRequest(models=paths, runs=runs or profile.runs,
                               conventions=tuple(map(input_convention, paths)),
                               warmup=profile.warmup if warmup is None else warmup,
                               threads=threads or profile.threads,
                               xnnpack=profile.xnnpack if xnnpack is None else xnnpack, runtime=profile.runtime,
                               inputs=batch, outputs=Path(outputs) if outputs else None, keep_times=keep_times)
        result = get_transport(profile).bench(request)
    device = {"name": profile.name, "transport": profile.transport, "emulated": profile.emulated}
    result["device"] = device
    for r in result.get("results", []):
        r["device"] = device
    return result


def compare(model_a, model_b, profile: DeviceProfile | None = None, *, reference: bool = True, **kwargs) -> dict:
    """A and B alternating on the device, with the per-pair ratio B/A and the notes that explain it.

    On a remote device (or another interpreter here), a short comparison with
    this venv's runtime gives the build machine's ratio, so a device whose
    ratio is far from it is pointed out.
    """
    profile = profile or load_profile("local")
    result = bench([model_a, model_b], profile, **kwargs)
    ref = None
    if reference and (profile.transport != "local" or profile.python or profile.runtime != "auto"):
        local = replace(load_profile("local"), threads=kwargs.get("threads") or profile.threads)
        ref = bench([model_a, model_b], local, runs=min(REFERENCE_RUNS, kwargs.get("runs") or profile.runs),
                    warmup=2, inputs=kwargs.get("inputs"), xnnpack=kwargs.get("xnnpack"))
        result["reference"] = {"device": "local", "ratio_b_over_a": ref["compare"]["ratio_b_over_a"],
                               "runtime": ref["results"][0]["runtime"]}
    result["notes"] = explain_pair(result, ref)
    return result


def _check_threads(threads: list[int], *, at_least_one: bool = False) -> None:
    if (at_least_one and not threads) or any(t < 1 for t in threads):
        raise DeviceError("thread counts are positive integers, e.g. 1,2,4", setting="threads")


def sweep(model, threads: list[int], profile: DeviceProfile | None = None, **kwargs) -> list[dict]:
    """One bench per thread count (separate processes, so no thread pool is reused)."""
    _check_threads(threads, at_least_one=True)
    return [bench([model], profile, threads=t, **kwargs) for t in threads]

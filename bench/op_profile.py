"""Where an int8 model's latency goes, per op type, beside this machine's int8 GEMM floor.

    python -m bench.op_profile MODEL.tflite [--threads 2] [--runs 40] [--out FILE.json]

Each op of the model is cut out as a model of its own (its constants inside,
its activations as inputs and outputs: ``pipeline.tflite.pieces``) and timed
alone under LiteRT with XNNPACK on random inputs of its types (p50 of
``--runs``); the per-type sums stand beside the whole model's p50, itself
timed in the same process before and after the ops. The sum of the ops is not
the model's time: inside one XNNPACK partition, the ops share one runtime and
no tensor crosses a delegate boundary, so the shares say where the time
goes, not exactly how much.

The floor: one int8 1x1 convolution large enough to run at the machine's int8
GEMM rate (its multiply-accumulates per second, p50), against the model's
multiply-accumulates (CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED, from
their shapes). Depthwise convolutions reach a fraction of that rate on any
CPU (no reuse of each weight across channels), so the floor is a bound, not
a target every op can meet.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from pathlib import Path

import numpy as np

from bench import machine
from pipeline.conversion.converter_hooks import fast_minmax, quantize_calibrated, quantizer_route
from pipeline.core import artifacts
from pipeline.core.tf_logs import import_tensorflow_quietly, native_stderr_captured
from pipeline.tflite import flatbuffers
from pipeline.tflite.pieces import PiecewiseRun
from pipeline.tflite.runtime import open_interpreter

_FLOOR_SHAPE = (56, 56, 512, 512)  # input H, W, C and filters: 822M multiply-accumulates, far past any cache


def p50_ms(model_bytes: bytes, threads: int, runs: int, seed: int = 0) -> float:
    """Median invoke time of a model on random inputs of its input types, after a warm-up."""
    interpreter = open_interpreter(model_bytes, threads=threads)
    rng = np.random.default_rng(seed)
    for detail in interpreter.get_input_details():
        dtype = np.dtype(detail["dtype"])
        if dtype.kind == "f":
            value = rng.standard_normal(detail["shape"]).astype(dtype)
        else:
            info = np.iinfo(dtype)
            value = rng.integers(info.min, info.max, detail["shape"], endpoint=True).astype(dtype)
        interpreter.set_tensor(detail["index"], value)
    for _ in range(max(3, runs // 10)):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def macs(model_bytes: bytes) -> dict[int, int]:
    """Multiply-accumulates of each weighted op of the model (op index -> count), from its tensor shapes."""
    model = flatbuffers.read(model_bytes)
    graph = model.subgraphs[0]
    found = {}
    for index, op in enumerate(graph.operators):
        name = flatbuffers.op_name(model, op)
        if name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        out = int(np.prod(graph.tensors[op.outputs[0]].shape))
        weights = [int(d) for d in graph.tensors[op.inputs[1]].shape]
        if name == "CONV_2D":  # weights [out, kh, kw, in]
            per_output = int(np.prod(weights[1:]))
        elif name == "DEPTHWISE_CONV_2D":  # [1, kh, kw, channels]: one input channel per output
            per_output = weights[1] * weights[2]
        else:  # [out, in]
            per_output = weights[-1]
        found[index] = out * per_output
    return found


def gemm_rate(threads: int, runs: int) -> dict:
    """This machine's int8 GEMM rate under XNNPACK: one int8 1x1 convolution of ``_FLOOR_SHAPE``, timed."""
    tf = import_tensorflow_quietly()
    height, width, channels, filters = _FLOOR_SHAPE
    inputs = tf.keras.Input((height, width, channels), batch_size=1)
    rng = np.random.default_rng(0)
    samples = [[rng.standard_normal((1, height, width, channels)).astype(np.float32)] for _ in range(4)]
    with contextlib.redirect_stdout(io.StringIO()), native_stderr_captured():  # the converter's chatter
        float_model = tf.lite.TFLiteConverter.from_keras_model(
            tf.keras.Model(inputs, tf.keras.layers.Conv2D(filters, 1)(inputs))).convert()
        int8 = quantize_calibrated(fast_minmax(float_model, samples)[0], route=quantizer_route(), per_channel=True)
    count = height * width * channels * filters
    ms = p50_ms(int8, threads, runs)
    return {"shape": list(_FLOOR_SHAPE), "macs": count, "p50_ms": round(ms, 3), "gmac_per_s": round(count / ms / 1e6, 2)}


def profile(model_path: Path, threads: int, runs: int) -> dict:
    model_bytes = model_path.read_bytes()
    whole_before = p50_ms(model_bytes, threads, runs)
    run = PiecewiseRun(model_bytes, [])
    counts = macs(model_bytes)
    by_type: dict[str, dict] = {}
    ops = []
    for index in range(len(run.graph.operators)):
        name = run.op_name(index)
        ms = p50_ms(run.one_op(index), threads, runs)
        entry = by_type.setdefault(name, {"ops": 0, "ms": 0.0, "macs": 0})
        entry["ops"] += 1
        entry["ms"] += ms
        entry["macs"] += counts.get(index, 0)
        ops.append({"op": index, "type": name, "ms": round(ms, 4), "macs": counts.get(index, 0)})
    run.close()
    whole = statistics.median([whole_before, p50_ms(model_bytes, threads, runs)])
    total_ops = sum(entry["ms"] for entry in by_type.values())
    for entry in by_type.values():
        entry["share"] = round(entry["ms"] / total_ops, 4)
        entry["ms"] = round(entry["ms"], 3)
        entry["gmac_per_s"] = round(entry["macs"] / entry["ms"] / 1e6, 2) if entry["macs"] and entry["ms"] else None
    rate = gemm_rate(threads, runs)
    floor_ms = sum(counts.values()) / (rate["gmac_per_s"] * 1e6)
    return {"model": str(model_path), "sha256": artifacts.sha256_any(model_path), "threads": threads, "runs": runs,
            "model_p50_ms": round(whole, 3), "ops_sum_ms": round(total_ops, 3), "macs": sum(counts.values()),
            "gemm": rate, "floor_ms": round(floor_ms, 3), "over_floor": round(whole / floor_ms, 3),
            "by_type": dict(sorted(by_type.items(), key=lambda item: -item[1]["ms"])), "ops": ops}


def table(result: dict) -> str:
    lines = [f"model p50 {result['model_p50_ms']} ms; int8 GEMM floor {result['floor_ms']} ms "
             f"({result['macs'] / 1e9:.2f} GMAC at {result['gemm']['gmac_per_s']} GMAC/s); "
             f"{result['over_floor']}x the floor; ops timed alone sum to {result['ops_sum_ms']} ms",
             "| op type | ops | ms (alone, summed) | share | GMAC/s |", "|---|---|---|---|---|"]
    for name, entry in result["by_type"].items():
        lines.append(f"| {name} | {entry['ops']} | {entry['ms']} | {entry['share']:.1%} | {entry['gmac_per_s'] or ''} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.op_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="an int8 .tflite (e.g. from convert --int8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    load = machine.load_average()
    result = profile(args.model, args.threads, args.runs)
    result["machine"] = machine.describe(load)
    print(table(result))
    if args.out:
        artifacts.atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()

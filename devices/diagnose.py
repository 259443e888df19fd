"""Why an int8 model is not faster than float here: the runtime, delegation, threads.

The runtime matters as much as the model. Measured on one int8 Xception-299
(2 threads): LiteRT 2.3 ran it in 46 ms against 75 ms for float32, while
tflite-runtime 2.14 ran the same int8 model in 305 ms against 93 ms for float32,
because its XNNPACK takes no int8 ops and leaves them to reference kernels;
outputs were identical. A bench that shows int8 slower than float, or a ratio
far from the build machine's, says so and names the likely cause instead of
leaving the user to guess.
"""

from __future__ import annotations

FAR_FACTOR = 1.5  # a device ratio this many times off the build machine's is worth a note
SLOWER = 1.1  # int8 at least 10% slower than float: beyond the pair-to-pair noise of a busy machine


def _is_int8(result: dict) -> bool:
    model = result.get("model") or {}
    return model.get("precision") == "int8" or model.get("input_dtype") in ("int8", "uint8")


def explain_pair(result: dict, reference: dict | None = None) -> list[str]:
    """Notes for a comparison result (``compare`` + ``results`` [A, B]) of a float and an int8 model."""
    a, b = result["results"]
    ratio = result["compare"]["ratio_b_over_a"]["p50"]
    if _is_int8(a) == _is_int8(b):
        return []
    quant, flt = (b, a) if _is_int8(b) else (a, b)
    int8_over_float = ratio if quant is b else 1.0 / ratio
    notes: list[str] = []
    runtime = quant.get("runtime") or {}
    rt = f"{runtime.get('name')} {runtime.get('version') or ''}".strip()
    ops = quant.get("ops") or {}
    if reference is not None:
        ref = reference["compare"]["ratio_b_over_a"]["p50"]
        ref_int8_over_float = ref if quant is b else 1.0 / ref
        if not (1 / FAR_FACTOR <= int8_over_float / ref_int8_over_float <= FAR_FACTOR):
            ref_rt = reference["results"][0]["runtime"]
            notes.append(f"int8/float is {int8_over_float:.2f} here but {ref_int8_over_float:.2f} on the build "
                         f"machine ({ref_rt['name']} {ref_rt.get('version') or ''}); the runtime, its delegate "
                         "and the thread count differ, not the model")
    if int8_over_float <= SLOWER and not notes:
        return notes
    if int8_over_float > SLOWER:
        notes.append(f"the int8 model is {int8_over_float:.2f}x slower than float32 with {rt}")
    if not quant.get("xnnpack", True):
        notes.append("XNNPACK is off, so both models run on builtin kernels; int8 builtin kernels are often "
                     "slower than XNNPACK's float32")
    elif ops.get("delegate_partitions") == 0:
        notes.append(f"XNNPACK took no op of the int8 graph ({ops.get('nodes')} nodes on reference kernels): "
                     f"{rt} does not run int8 through XNNPACK (tflite-runtime 2.14 on Xception-299: 305 ms int8 "
                     "vs 93 ms float32). Use ai-edge-litert (LiteRT) on the device")
    elif ops.get("delegate_partitions", 0) > 1:
        notes.append(f"XNNPACK split the int8 graph into {ops['delegate_partitions']} partitions; the ops between "
                     "them run on builtin kernels and every boundary costs a copy. Check the ops left outside "
                     "(convert --int8 manifest: ops_left_float)")
    elif runtime.get("name") == "tflite_runtime":
        notes.append(f"{rt} is an old interpreter build; LiteRT (ai-edge-litert) has faster int8 kernels")
    threads, cores = quant.get("threads"), (quant.get("machine") or {}).get("cpu_count")
    if threads == 1 and cores and cores > 1:
        sweep = ",".join(str(t) for t in sorted({1, 2, cores}))
        notes.append(f"1 thread on {cores} cores: try --threads {sweep} to see how each model scales")
    return notes

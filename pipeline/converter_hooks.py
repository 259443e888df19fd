"""The one place that reaches into TFLiteConverter's private calibration step.

Why: the converter's calibrator runs the float model one sample at a time in
a single-threaded logging interpreter without XNNPACK (about 0.7 s per
299x299 image on this project's machine). Calibration only needs each
activation tensor's min and max, so ``fast_minmax`` runs a copy of the float
model in which every activation is also a graph output, under XNNPACK, on
all cores, and writes the exact min/max into the tensors' quantization
parameters: the same calibrated model the converter's quantizer expects.

What differs from the stock calibrator, and why it is right: the logging
interpreter records an op's inputs after the op ran, and an ADD whose input
buffer is reused in place for its output then logs the *sum* as that input.
So the stock ranges of tensors consumed in place by an ADD (the max pool
before each entry-flow Add, the last separable conv of each middle-flow
block) are the union of their true range and the sum's. Here every tensor
gets its true range; on every other tensor the two agree exactly (a test
checks this), and accuracy against the float model is measured in
``tests/test_converter_hooks.py`` and the bench.

Pinned to the TensorFlow version below: on any other version, or if the
private names are missing, conversion falls back to the stock calibrator and
the manifest says so.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SUPPORTED_TF = ("2.21.",)
_FLT_MAX = float(np.finfo(np.float32).max)
_FLT_MIN = float(np.finfo(np.float32).tiny)  # the stock logger starts max at FLT_MIN, not -FLT_MAX


def hooks_supported() -> tuple[bool, str]:
    """Whether this TensorFlow has the private calibrator the fast path replaces."""
    try:
        import tensorflow as tf
        from tensorflow.lite.python.optimize import calibrator
    except ImportError as exc:
        return False, f"cannot import the TFLite calibrator ({exc})"
    if not tf.__version__.startswith(SUPPORTED_TF):
        return False, f"fast calibration is pinned to TensorFlow {'/'.join(SUPPORTED_TF)}x, found {tf.__version__}"
    if not callable(getattr(calibrator.Calibrator, "calibrate", None)):
        return False, "tf.lite Calibrator.calibrate is gone"
    return True, "ok"


def _activation_tensors(graph) -> list[int]:
    """Graph inputs and every op output: the tensors the stock calibrator logs."""
    seen = [int(i) for i in graph.inputs]
    for op in graph.operators or []:
        seen.extend(int(o) for o in (op.outputs if op.outputs is not None else []) if int(o) >= 0)
    return list(dict.fromkeys(seen))


def _minmax(view) -> tuple[float, float]:
    """Min and max of an interpreter tensor read in place (no copy); no reference outlives the call,
    as LiteRT refuses to invoke while a view of its buffers is alive."""
    values = view()
    mn, mx = float(values.min()), float(values.max())
    if np.isnan(mn) or np.isnan(mx):  # the stock logger skips NaNs
        mn, mx = float(np.nanmin(values)), float(np.nanmax(values))
    del values
    return mn, mx


def fast_minmax(float_model: bytes, samples, *, workers: int | None = None) -> tuple[bytes, dict]:
    """Calibrate ``float_model`` on ``samples`` (an iterable of input lists); return calibrated bytes."""
    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    from pipeline.quiet import native_stderr_captured

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(float_model))
    if len(model.subgraphs) != 1:
        raise NotImplementedError("fast calibration handles single-subgraph models only")
    graph = model.subgraphs[0]
    float32 = schema.TensorType.FLOAT32
    tracked = [t for t in _activation_tensors(graph) if graph.tensors[t].type == float32]
    original_outputs = graph.outputs
    graph.outputs = np.asarray(list(dict.fromkeys([int(o) for o in original_outputs] + tracked)), dtype=np.int32)
    probe = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    graph.outputs = original_outputs

    workers = workers or max(1, min(4, os.cpu_count() or 1))
    source = iter(samples)
    lock = threading.Lock()

    def work() -> tuple[np.ndarray, np.ndarray, int]:
        with native_stderr_captured():
            interpreter = Interpreter(model_content=probe, num_threads=1)
            interpreter.allocate_tensors()
        inputs = interpreter.get_input_details()
        lo = np.full(len(tracked), _FLT_MAX, dtype=np.float64)
        hi = np.full(len(tracked), _FLT_MIN, dtype=np.float64)
        count = 0
        while True:
            with lock:
                sample = next(source, None)
            if sample is None:
                return lo, hi, count
            arrays = list(sample.values()) if isinstance(sample, dict) else list(sample)
            for detail, array in zip(inputs, arrays):
                interpreter.set_tensor(detail["index"], np.asarray(array, dtype=np.float32))
            interpreter.invoke()
            for k, t in enumerate(tracked):
                mn, mx = _minmax(interpreter.tensor(t))
                lo[k] = min(lo[k], mn)
                hi[k] = max(hi[k], mx)
            count += 1

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda _: work(), range(workers)))
    count = sum(r[2] for r in results)
    if count == 0:
        raise ValueError("the representative dataset yielded no samples")
    lo = np.min([r[0] for r in results], axis=0)  # exact merge: min of mins, max of maxes
    hi = np.max([r[1] for r in results], axis=0)
    for k, t in enumerate(tracked):
        params = graph.tensors[t].quantization or schema.QuantizationParametersT()
        params.min = [np.float32(lo[k])]
        params.max = [np.float32(hi[k])]
        graph.tensors[t].quantization = params
    calibrated = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    return calibrated, {"calibrator": "fast-minmax", "samples": count, "tensors": len(tracked), "workers": workers}


@contextlib.contextmanager
def fast_calibration(record: dict):
    """Within this block, the converter's calibration step runs ``fast_minmax``.

    ``record`` receives what happened: the calibrator used, or why the stock
    one ran instead. Any failure of the fast path falls back to the stock
    calibrator on the same data, so a conversion never fails because of it.
    """
    ok, why = hooks_supported()
    if not ok:
        record.update({"calibrator": "stock", "fallback": why})
        yield record
        return
    from tensorflow.lite.python.optimize import calibrator

    stock = calibrator.Calibrator.calibrate

    def calibrate(self, dataset_gen):
        # dataset_gen is the converter's generator function: calling it again replays the samples.
        try:
            calibrated, info = fast_minmax(self._model_content, dataset_gen())  # noqa: SLF001
        except Exception as exc:  # noqa: BLE001 - any failure here must not fail the conversion
            record.update({"calibrator": "stock", "fallback": f"fast path failed: {type(exc).__name__}: {exc}"})
            return stock(self, dataset_gen)
        record.update(info)
        return calibrated

    calibrator.Calibrator.calibrate = calibrate
    try:
        yield record
    finally:
        calibrator.Calibrator.calibrate = stock

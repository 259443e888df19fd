"""Running .tflite bytes: the one place they become an interpreter, and the one quantize-invoke-dequantize step.

Every part of the library that runs a model (validation, the rewrite check,
the budget search, per-layer error) goes through here, so XNNPACK's refusals
and the model's own I/O quantization are handled once. ``devices/runner.py``
keeps its own copy on purpose: it runs on devices without this package.
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.core.errors import ModelLoadError
from pipeline.core.preprocessing import dequantize, quantize
from pipeline.core.quiet import native_stderr_captured


def allocated(model_bytes: bytes, *, threads: int = 1, preserve_all_tensors: bool = False):
    """An allocated LiteRT interpreter; when XNNPACK refuses the graph, one on the builtin kernels.

    XNNPACK refuses some graphs whole (extreme requantization scales); the
    builtin kernels compute the same numbers, slower, and ``convert`` warns
    about such models when it writes them. LiteRT's own error is raised
    otherwise (the sandboxed probe's child reports it as it is).
    ``preserve_all_tensors`` turns off the default XNNPACK delegate, whose
    internal tensors are not kept.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    builtin = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    resolver = builtin if preserve_all_tensors else OpResolverType.AUTO
    try:
        interpreter = Interpreter(model_content=model_bytes, num_threads=threads,
                                  experimental_op_resolver_type=resolver,
                                  experimental_preserve_all_tensors=preserve_all_tensors)
        interpreter.allocate_tensors()
        return interpreter
    except (ValueError, RuntimeError) as exc:
        if "XNNPACK" not in str(exc) or resolver == builtin:
            raise
    interpreter = Interpreter(model_content=model_bytes, num_threads=threads, experimental_op_resolver_type=builtin)
    interpreter.allocate_tensors()
    return interpreter


def open_interpreter(model_bytes: bytes, *, preserve_all_tensors: bool = False, threads: int = 1,
                     name: str = "this model"):
    """The one place where .tflite bytes become an interpreter, in this process (``allocated``, errors typed).

    Bytes of a file nobody vouched for get here only after they loaded and ran
    once in ``pipeline.tflite.safe_tflite``'s limited child process
    (``TfliteRunner`` and ``export.float_tflite`` wait for that probe); the
    other callers pass bytes this process converted.
    """
    with native_stderr_captured() as log:  # "INFO: Created TensorFlow Lite XNNPACK delegate", or the real error
        try:
            return allocated(model_bytes, threads=threads, preserve_all_tensors=preserve_all_tensors)
        except (ValueError, RuntimeError) as exc:
            error = exc
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    detail = log.tail(3)
    raise ModelLoadError(f"LiteRT cannot load {name}: {first}" + (f"\n{detail}" if detail else ""))


def invoke_one(interpreter, x: np.ndarray) -> np.ndarray:
    """The model's raw output for one float input (HxWx3): the model's own input quantization applied."""
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.set_tensor(inp["index"], quantize(np.asarray(x)[None], inp["dtype"], *inp["quantization"]))
    interpreter.invoke()
    return interpreter.get_tensor(out["index"]).copy()


def run_batch(model_bytes: bytes, inputs, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dequantized and raw outputs of a batch-1 model over float ``inputs`` (raw integers as int64)."""
    interpreter = open_interpreter(model_bytes, threads=threads or os.cpu_count() or 1)
    out = interpreter.get_output_details()[0]
    rows, raw = [], []
    for x in inputs:
        q = invoke_one(interpreter, x)
        raw.append(q.astype(np.int64) if q.dtype.kind in "iu" else q)
        rows.append(dequantize(q, *out["quantization"]))
    return np.concatenate(rows), np.concatenate(raw)

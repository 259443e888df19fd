"""Running .tflite bytes in this process: an interpreter with XNNPACK's refusals handled, and a batch run.

Validation's runners, parity's reference, the budget search, per-layer error
and the rewrite check open their interpreters with ``open_interpreter``, so
XNNPACK refusing a graph and LiteRT's own load errors are handled once. The
quantize-invoke-dequantize loop itself is not shared: ``run_batch`` (the
rewrite check, float outputs) and ``invoke_one`` (validation) are here, while
the budget search runs its own over one interpreter per thread, per-layer
error reads intermediate tensors, and parity keeps the raw integers; all of
them quantize and dequantize with ``pipeline.core.preprocessing``'s one
definition. Two places build a bare interpreter on purpose: the fast
calibrator (``conversion.converter_hooks``: a probe model, one per thread)
and the XNNPACK report (``rewrites``: its own log captured).
``devices/runner.py`` keeps its own copy: it runs on devices without this package.

LiteRT's private per-node view is read here alone, behind a version pin, with
the flatbuffer's own ops as the tested fallback (``graph_ops``,
``delegated_nodes``).
"""

from __future__ import annotations

import os
from importlib import metadata

import numpy as np

from pipeline.core.errors import ModelLoadError
from pipeline.core.preprocessing import dequantize, quantize
from pipeline.core.tf_logs import native_stderr_captured
from pipeline.tflite import flatbuffers

# LiteRT's per-node view (``Interpreter._get_ops_details``) is private: it is read only on these versions of
# ai-edge-litert, after checking that it is still there. The one module that reads a private LiteRT name.
SUPPORTED_LITERT = ("2.3.",)


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
    once in ``pipeline.tflite.sandboxed_load``'s limited child process
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


def node_view_supported(interpreter) -> tuple[bool, str]:
    """Whether LiteRT's private per-node view may be read from ``interpreter``: (True, "ok"), or (False, why)."""
    try:
        version: str | None = metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        version = None
    if version is None or not version.startswith(SUPPORTED_LITERT):
        return False, f"LiteRT's per-node view is pinned to ai-edge-litert {'/'.join(SUPPORTED_LITERT)}x, found {version}"
    if not callable(getattr(interpreter, "_get_ops_details", None)):
        return False, "ai_edge_litert Interpreter._get_ops_details is gone"
    return True, "ok"


def _nodes(interpreter) -> list[dict]:
    return [{"op_name": str(d["op_name"]), "inputs": [int(t) for t in d["inputs"]],
             "outputs": [int(t) for t in d["outputs"]]}
            for d in interpreter._get_ops_details()]  # noqa: SLF001 - after node_view_supported, the only per-node view


def delegated_nodes(interpreter) -> tuple[list[dict] | None, str]:
    """The interpreter's nodes after delegation (one ``DELEGATE`` node per XNNPACK partition, beside the ops
    it took): ``op_name`` and the ``inputs``/``outputs`` tensor indices. (None, why) where that view is not
    available: nothing public says how a delegate cut the graph."""
    ok, why = node_view_supported(interpreter)
    return (_nodes(interpreter), "ok") if ok else (None, why)


def graph_ops(interpreter, model_bytes: bytes) -> list[dict]:
    """Which op reads and writes which tensors: ``op_name``, ``inputs``, ``outputs`` of every node of
    ``interpreter`` (opened on ``model_bytes``).

    LiteRT's per-node view where it may be read (``DELEGATE`` nodes included
    when a delegate took part of the graph); otherwise the flatbuffer's own
    operators (subgraph 0), which are the interpreter's nodes in the same order
    with the same tensor indices, before any delegate.
    """
    if node_view_supported(interpreter)[0]:
        return _nodes(interpreter)
    return flatbuffer_ops(model_bytes)


def flatbuffer_ops(model_bytes: bytes) -> list[dict]:
    """The stock view ``graph_ops`` falls back to: subgraph 0's operators, read in place."""
    model = flatbuffers.schema().Model.GetRootAs(model_bytes, 0)
    graph = model.Subgraphs(0)
    names = flatbuffers.op_names()
    ops = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        name = names.get(flatbuffers.builtin_code(code), "?")
        if name == "CUSTOM" and code.CustomCode():
            name = code.CustomCode().decode()
        ops.append({"op_name": name, "inputs": [int(op.Inputs(j)) for j in range(op.InputsLength())],
                    "outputs": [int(op.Outputs(j)) for j in range(op.OutputsLength())]})
    return ops

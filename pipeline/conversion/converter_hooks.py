"""The one place that reaches into TFLiteConverter's private calibration step.

Why: the converter's calibrator runs the float model one sample at a time in
a single-threaded logging interpreter without XNNPACK (about 0.7 s per
299x299 image on this project's machine). Calibration only needs each
activation tensor's min and max, so ``fast_minmax`` runs a copy of the float
model in which every activation is also a graph output, under XNNPACK, one
single-threaded interpreter per core and at most 4 (no activation buffer is
reused, so each interpreter holds all of them at once), and writes the
min/max over all samples into the tensors' quantization parameters: the same
calibrated model the converter's quantizer expects. The per-interpreter
ranges merge exactly, so the result does not depend on how many ran.

What differs from the stock calibrator, and why it is right: the logging
interpreter records an op's inputs after the op ran, and an ADD whose input
buffer is reused in place for its output (TFLite's memory planner does this
for an input nothing else reads) then logs the *sum* as that input. So the
stock ranges of tensors consumed in place by an ADD (the max pool before
each entry-flow Add, the last separable conv of each middle-flow block) are
the union of their true range and the sum's. Here every tensor gets its true
range; on every other tensor the two agree up to float rounding, since
XNNPACK and the logging interpreter's kernels sum in different orders
(``tests/conversion/test_converter_hooks.py`` checks both on exactly those tensors,
and accuracy against the float model; so does the bench).

The int8 conversion runs in three stages (``staged_int8``) instead of one
``converter.convert()``: the float conversion, calibration, and the MLIR
quantizer, which are the converter's own steps called in its own order
(``TFLiteConverterBase._quantize``). Why: each stage's result is reused. The
float model and its calibrated copy are the same for every int8 variant of a
source, so ``convert --max-drop`` only re-runs the quantizer (about 1 s on
Xception-299) for each candidate set of float layers, and a float ``.tflite``
can be quantized directly, as ONNX Runtime's ``quantize_static`` quantizes an
ONNX graph. The staged model equals the converter's in every flatbuffer field
(op options included) apart from its CONVERSION_METADATA entry, which the
converter would fill with its own options (``tests/conversion/test_staged_convert.py``);
the manifest says the same.

Freezing (``fast_freeze``): the converter freezes the traced function into a
GraphDef, then imports that GraphDef back into a new function only to read
its input and output tensors (1.9 s of 2.1 on Xception-299); the original
function's tensors have the same names, types and shapes.

Pinned to the TensorFlow version below: on any other version, or if the
private names are missing, conversion falls back to the stock path and the
manifest says so. Per-tensor weight scales (``disable_per_channel``) have no
stock path: there they are refused. No other module reads a private
TensorFlow name (``tests/test_architecture.py``).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Callable, Collection, Sequence

import numpy as np

from pipeline.core import interrupts
from pipeline.core.errors import ConversionError
from pipeline.core.tf_logs import native_stderr_captured
from pipeline.tflite import flatbuffers
from pipeline.tflite.flatbuffers import tools
from pipeline.tflite.weighted_layers import InputSums, pointwise_inputs

SUPPORTED_TF = ("2.21.",)
_FLT_MAX = float(np.finfo(np.float32).max)
_FLT_MIN = float(np.finfo(np.float32).tiny)  # the stock logger starts max at FLT_MIN, not -FLT_MAX


def tf_supported() -> tuple[bool, str]:
    """The one version pin for every private converter entry point used in this module."""
    version = _tf_version()
    if version is None or not version.startswith(SUPPORTED_TF):
        return False, f"pinned to TensorFlow {'/'.join(SUPPORTED_TF)}x, found {version}"
    return True, "ok"


def _private_module(what: str, name: str):
    """(module, "ok") when TensorFlow is the pinned version and ``name`` imports; (None, why) otherwise."""
    ok, why = tf_supported()
    if not ok:
        return None, f"{what} is {why}"
    try:
        return importlib.import_module(name), "ok"
    except ImportError as exc:
        return None, f"cannot import {name} ({exc})"


def calibrator_supported() -> tuple[bool, str]:
    """Whether this TensorFlow has the private calibrator the fast path replaces."""
    calibrator, why = _private_module("fast calibration", "tensorflow.lite.python.optimize.calibrator")
    if calibrator is not None and not callable(getattr(calibrator.Calibrator, "calibrate", None)):
        why = "tf.lite Calibrator.calibrate is gone"
    return why == "ok", why


def denylist_supported() -> tuple[bool, str]:
    """Whether this TensorFlow's MLIR quantizer still takes ``denylisted_nodes`` (per-layer float fallback)."""
    lite, why = _private_module("per-layer float fallback", "tensorflow.lite.python.lite")
    quantize = getattr(lite, "_mlir_quantize", None)
    if lite is not None and not callable(quantize):
        why = "tensorflow.lite.python.lite._mlir_quantize is gone"
    elif quantize is not None and "denylisted_nodes" not in inspect.signature(quantize).parameters:
        why = "tensorflow.lite.python.lite._mlir_quantize no longer takes denylisted_nodes"
    return why == "ok", why


@contextlib.contextmanager
def keep_float(denylist_for: Callable[[bytes], list[str]]):
    """Within this block, the converter's MLIR quantizer leaves the nodes ``denylist_for(calibrated)`` names in float.

    TFLite's only way to leave a node unquantized is ``mlir_quantize(...,
    denylisted_nodes=...)``, which the public converter never exposes; the
    converter's own call (made after calibration) is wrapped, so every other
    step (int8 I/O, buffer deduplication) stays the stock one.
    """
    ok, why = denylist_supported()
    if not ok:
        raise ConversionError(f"cannot keep layers in float: {why}")
    from tensorflow.lite.python import lite

    stock_quantize = lite._mlir_quantize  # noqa: SLF001

    def mlir_quantize(calibrated, *args, **kwargs):
        return stock_quantize(calibrated, *args, denylisted_nodes=denylist_for(calibrated), **kwargs)

    lite._mlir_quantize = mlir_quantize  # noqa: SLF001
    try:
        yield
    finally:
        lite._mlir_quantize = stock_quantize  # noqa: SLF001


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


# Ops for which the converter's calibrator first adds intermediate tensors (TFLite's
# quantization_wrapper_utils: the LSTM family); for any other model that step changes nothing.
_NEEDS_INTERMEDIATES = ("LSTM", "UNIDIRECTIONAL_SEQUENCE_LSTM", "BIDIRECTIONAL_SEQUENCE_LSTM")


def _add_intermediate_tensors(model_bytes: bytes) -> bytes:
    """The converter's first calibration step, skipped (no TensorFlow needed) when no op needs it.

    Not LiteRT's copy of the wrapper: loading both pybind modules in one
    process breaks TensorFlow's own calibrator (measured: its import fails).
    """
    model = flatbuffers.schema().Model.GetRootAs(model_bytes, 0)  # reads the op codes in place, nothing else
    names = flatbuffers.op_names()
    codes = set()
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        codes.add(names.get(flatbuffers.builtin_code(code)))
    if not codes & set(_NEEDS_INTERMEDIATES):
        return model_bytes
    from tensorflow.lite.python.optimize import calibrator

    return bytes(calibrator.add_intermediate_tensors(model_bytes))


def _drop_conversion_metadata(model) -> None:
    model.metadata = [m for m in (model.metadata or []) if m.name not in (b"CONVERSION_METADATA",
                                                                           "CONVERSION_METADATA")]


def fast_minmax(float_model: bytes, samples, *, workers: int | None = None, drop_conversion_metadata: bool = False,
                summed: Sequence[int] = ()) -> tuple[bytes, dict, InputSums | None]:
    """Calibrate ``float_model`` on ``samples`` (an iterable of input lists): the calibrated bytes, what ran,
    and the sums of the ``summed`` activation tensors over the samples (``None`` when none were asked): bias
    correction's float means, taken in the same pass. Those only 1x1 stride-1 layers read (``pointwise_inputs``)
    are summed as their means over positions (``weighted_layers.pool``): one BLAS pass per image, not an
    addition into a whole image's sums, which moves three times the memory."""
    flatbuffer_utils, schema = tools()
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(float_model))
    if drop_conversion_metadata:
        _drop_conversion_metadata(model)
    if len(model.subgraphs) != 1:
        raise NotImplementedError("fast calibration handles single-subgraph models only")
    graph = model.subgraphs[0]
    float32 = schema.TensorType.FLOAT32
    tracked = [t for t in _activation_tensors(graph) if graph.tensors[t].type == float32]
    known = set(tracked)
    summed = [t for t in summed if t in known]
    pooled = pointwise_inputs(float_model) if summed else set()
    original_outputs = graph.outputs
    graph.outputs = np.asarray(list(dict.fromkeys([int(o) for o in original_outputs] + tracked)), dtype=np.int32)
    probe = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    graph.outputs = original_outputs

    workers = workers or max(1, min(4, os.cpu_count() or 1))
    if summed:  # a fixed share per worker, run in order: float sums then do not depend on the threads' timing
        listed = list(samples)
        sources = [iter(listed[k::workers]) for k in range(workers)]
    else:  # min and max are exact in any order: the workers take samples as they come
        sources = [iter(samples)] * workers
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda k: _minmax_worker(probe, tracked, summed, pooled, sources[k], lock),
                                range(workers)))
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
    sums = InputSums({t: _merged([r[3][t] for r in results if t in r[3]], graph.tensors[t].shape, t in pooled)
                      for t in summed}, count) if summed else None
    return calibrated, {"calibrator": "fast-minmax", "samples": count, "tensors": len(tracked),
                        "workers": workers}, sums


def _merged(shares: list[np.ndarray], shape, pooled: bool) -> np.ndarray:
    """The workers' sums of one tensor (of ``shape``) as one, float64; a pooled one (per channel, over every
    position) as the sum of the images' means over positions, 1x1x1xC (``weighted_layers.pool``)."""
    total = np.sum([share.astype(np.float64) for share in shares], axis=0)
    if not pooled:
        return total
    return (total / int(np.prod(shape[1:-1]))).reshape(1, 1, 1, -1)


def _minmax_worker(probe: bytes, tracked: list[int], summed: list[int], pooled: Collection[int], source,
                   lock: threading.Lock) -> tuple[np.ndarray, np.ndarray, int, dict[int, np.ndarray]]:
    """One thread's interpreter: takes samples from the shared ``source`` until it runs out; returns the min
    and max of each tracked tensor over the samples it ran, how many it ran, and the sums of the ``summed``
    tensors (float64)."""
    from ai_edge_litert.interpreter import Interpreter

    with native_stderr_captured():
        interpreter = Interpreter(model_content=probe, num_threads=1)
        interpreter.allocate_tensors()
    inputs = interpreter.get_input_details()
    lo = np.full(len(tracked), _FLT_MAX, dtype=np.float64)
    hi = np.full(len(tracked), _FLT_MIN, dtype=np.float64)
    count = 0
    sums: dict[int, np.ndarray] = {}
    while True:
        with lock:
            sample = next(source, None)
        if sample is None:
            return lo, hi, count, sums
        arrays = list(sample.values()) if isinstance(sample, dict) else list(sample)
        for detail, array in zip(inputs, arrays):
            interpreter.set_tensor(detail["index"], np.asarray(array, dtype=np.float32))
        interpreter.invoke()
        for k, t in enumerate(tracked):
            mn, mx = _minmax(interpreter.tensor(t))
            lo[k] = min(lo[k], mn)
            hi[k] = max(hi[k], mx)
        for t in summed:
            view = interpreter.tensor(t)()[0]  # read in place; no reference outlives the loop
            if t in pooled:  # one BLAS pass over the positions: a sum per channel
                flat = view.reshape(-1, view.shape[-1])
                if t not in sums:
                    sums[t] = np.zeros(flat.shape[1], np.float32)
                np.add(sums[t], np.ones(len(flat), np.float32) @ flat, out=sums[t])
                del flat
            elif t in sums:  # float32 sums: a float64 conversion per image would double the pass's cost
                np.add(sums[t], view, out=sums[t])
            else:
                sums[t] = view.copy()
            del view
        count += 1


def _tf_version() -> str | None:
    try:
        return metadata.version("tensorflow")
    except metadata.PackageNotFoundError:
        return None


class QuantizerRoute(enum.StrEnum):
    """Which binding of the one MLIR quantizer runs it (the same C++ either way)."""

    TENSORFLOW = "tensorflow"  # TensorFlow's Python API (``lite._mlir_quantize``)
    EXTENSION = "extension"  # the converter's extension module loaded by path, without TensorFlow's Python package


def quantizer_route() -> QuantizerRoute:
    """The route for a conversion in this process; the caller passes it on and records it.

    TensorFlow's API where TensorFlow is already loaded: loading its extension
    a second time by path would register the extension's types twice. The
    extension alone where it is not: quantizing a float .tflite then never
    pays TensorFlow's import (the CLI does not import it for that case).
    """
    return QuantizerRoute.TENSORFLOW if "tensorflow" in sys.modules else QuantizerRoute.EXTENSION


def staged_supported(route: QuantizerRoute) -> tuple[bool, str]:
    """Whether the converter's stages can be called one by one on ``route`` (on the extension route without
    importing TensorFlow: a float .tflite source then needs only its quantizer, see ``_converter_api``)."""
    ok, why = tf_supported()
    if not ok:
        return False, f"the staged int8 conversion is {why}"
    if route == QuantizerRoute.EXTENSION:
        return (True, "ok") if _converter_api_path() is not None else (False, "TensorFlow's MLIR quantizer is gone")
    ok, why = calibrator_supported()
    if not ok:
        return ok, why
    from tensorflow.lite.python import lite

    for name in ("_mlir_quantize", "_deduplicate_readonly_buffers", "_calibrator"):
        if not hasattr(lite, name):
            return False, f"tensorflow.lite.python.lite.{name} is gone"
    if not callable(getattr(lite._calibrator, "add_intermediate_tensors", None)):  # noqa: SLF001
        return False, "tf.lite calibrator.add_intermediate_tensors is gone"
    return True, "ok"


def _converter_api_path():
    """Where TensorFlow's converter extension lies, found without importing TensorFlow."""

    spec = importlib.util.find_spec("tensorflow")  # finds the package; runs none of it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "compiler" / "mlir" / "lite" / "python"
    found = sorted(folder.glob("_pywrap_converter_api*.so"))
    return found[0] if found else None


_API: list = []


def _converter_api():
    """TensorFlow's MLIR quantizer extension, loaded by path so that TensorFlow's Python package (2.7 s
    of CPU to import) stays unloaded. Only while nothing has imported TensorFlow: its own import would
    load the same extension under its own name."""
    if not _API:
        path = _converter_api_path()
        loader = importlib.machinery.ExtensionFileLoader("_pywrap_converter_api", str(path))  # its PyInit name
        spec = importlib.util.spec_from_file_location(loader.name, path, loader=loader)
        if spec is None:
            raise ImportError(f"cannot load TensorFlow's converter extension from {path}")
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        _API.append(module)
    return _API[0]


# tflite.IODataType (tensorflow/compiler/mlir/lite/types.proto): what TensorFlow's
# convert_tensor_tf_type_to_tflite_type hands the quantizer (a test checks these against it).
IO_FLOAT, IO_UINT8, IO_INT8, QUANTIZED_INT8 = 1, 17, 18, 9
IO_TYPES = {"float32": IO_FLOAT, "uint8": IO_UINT8, "int8": IO_INT8}


def _deduplicate_readonly_buffers(model_bytes: bytes) -> bytes:
    """TensorFlow's ``deduplicate_readonly_buffers`` (tensorflow/lite/python/convert.py, Apache-2.0),
    on LiteRT's flatbuffer tools: constant buffers with equal bytes are stored once."""


    flatbuffer_utils, _ = tools()
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(model_bytes))
    read_only: set[int] = set()
    for graph in model.subgraphs:
        inputs: set[int] = set()
        for op in graph.operators:
            for i, t in enumerate(op.inputs if op.inputs is not None else []):
                if op.mutatingVariableInputs is not None and i < len(op.mutatingVariableInputs) \
                        and op.mutatingVariableInputs[i]:
                    continue
                if graph.tensors[t].isVariable:
                    continue
                inputs.add(t)
        for op in graph.operators:
            inputs.difference_update(op.outputs if op.outputs is not None else [])
            inputs.difference_update(op.intermediates if op.intermediates is not None else [])
        inputs.difference_update(graph.inputs if graph.inputs is not None else [])
        inputs.difference_update(graph.outputs if graph.outputs is not None else [])
        read_only.update(graph.tensors[t].buffer for t in inputs)
    read_only = {b for b in read_only if b >= 0 and model.buffers[b].data is not None
                 and not isinstance(model.buffers[b].data, list) and model.buffers[b].data.size != 0}
    entries = sorted(((model.buffers[b].data.size, hashlib.md5(model.buffers[b].data.data.tobytes()).hexdigest(), b)
                      for b in read_only), key=lambda e: (e[0], e[1]), reverse=True)
    duplicate: dict[int, int] = {}
    for i, (size, digest, index) in enumerate(entries):
        if index in duplicate:
            continue
        for other_size, other_digest, other in entries[i + 1:]:
            if other in duplicate:
                continue
            if other_size != size:
                break
            if other_digest == digest:
                duplicate[other] = index
    for graph in model.subgraphs:
        for op in graph.operators:
            for t in op.inputs if op.inputs is not None else []:
                if graph.tensors[t].buffer in duplicate:
                    graph.tensors[t].buffer = duplicate[graph.tensors[t].buffer]
    for index in duplicate:
        model.buffers[index].data = None
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def without_conversion_metadata(model_bytes: bytes) -> bytes:
    """The model minus the converter's CONVERSION_METADATA entry (a float conversion's, which would
    describe the wrong options once quantized; the converter's own calibrator never sees one)."""

    flatbuffer_utils, _ = tools()
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    before = len(model.metadata or [])
    _drop_conversion_metadata(model)
    if len(model.metadata) == before:
        return model_bytes
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))  # the entry's buffer stays, unreferenced


def calibrate_float_model(float_model: bytes, samples_factory, record: dict, *, fast: bool = True,
                          summed: Sequence[int] = ()) -> tuple[bytes, InputSums | None]:
    """The converter's calibration step on a float .tflite (its CONVERSION_METADATA dropped), fast path first;
    with the sums of the ``summed`` tensors over the samples where the fast path ran (see ``fast_minmax``).

    ``samples_factory()`` returns a fresh iterable of input lists; the stock
    calibrator, the fallback (or the choice, ``fast=False``), replays them.
    The fast path imports no TensorFlow.
    """
    prepared = _add_intermediate_tensors(float_model)
    if fast:
        try:
            with interrupts.surfaced():  # an interrupt is not a failure of the fast path to fall back from
                calibrated, info, sums = fast_minmax(prepared, samples_factory(), drop_conversion_metadata=True,
                                                     summed=summed)
            record.update(info)
            return calibrated, sums
        except Exception as exc:  # noqa: BLE001 - the fast path must never fail a conversion
            record.update({"calibrator": "stock", "fallback": f"fast path failed: {type(exc).__name__}: {exc}"})
    else:
        record["calibrator"] = "stock"
    from tensorflow.lite.python import lite

    stock = lite._calibrator.Calibrator(without_conversion_metadata(prepared))  # noqa: SLF001
    return bytes(stock.calibrate(samples_factory)), None


def pin_input_range(calibrated: bytes, low: float, high: float) -> bytes:
    """The calibrated model with its graph inputs' ranges set to [low, high] instead of what calibration saw.

    Why: a pixel input must quantize to exactly scale 1 over [0, 255] whatever
    the calibration images happen to contain (the quantizer derives the input's
    scale and zero point from this min/max); the converter's single call has
    no place to say so.
    """
    model = flatbuffers.read(calibrated)
    schema = flatbuffers.schema()
    for graph in model.subgraphs:
        for index in graph.inputs:
            params = graph.tensors[int(index)].quantization or schema.QuantizationParametersT()
            params.min = [np.float32(low)]
            params.max = [np.float32(high)]
            graph.tensors[int(index)].quantization = params
    return flatbuffers.write(model)


# The extension's ExperimentalMlirQuantizeModel takes its arguments by position only (a pybind binding without
# argument names): these are their names, in the order of the pinned TensorFlow's
# ``tensorflow.lite.python.convert.mlir_quantize``, which a test keeps equal.
MLIR_QUANTIZE_ARGS = ("input_data_str", "disable_per_channel", "fully_quantize", "inference_type", "input_data_type",
                      "output_data_type", "enable_numeric_verify", "enable_whole_model_verify", "denylisted_ops",
                      "denylisted_nodes", "enable_variable_quantization", "disable_per_channel_for_dense_layers",
                      "debug_options_str")


def quantize_calibrated(calibrated: bytes, *, route: QuantizerRoute, io: str = "int8", output: str | None = None,
                        per_channel: bool, denylisted_nodes=None) -> bytes:
    """The converter's MLIR quantizer and buffer deduplication, as ``TFLiteConverterBase`` calls them for int8.

    ``route``: which binding runs it (``quantizer_route``). ``io``: the input
    type, "int8", "uint8" (the quantizer keeps the int8 scale and adds 128 to
    the zero point) or "float32"; ``output`` the output type (the input's when
    None).
    """
    nodes = list(denylisted_nodes or []) or None
    output = io if output is None else output
    for kind in (io, output):
        if kind not in IO_TYPES:
            raise ValueError(f"unknown I/O type {kind!r}; choose one of {', '.join(IO_TYPES)}")
    if route == QuantizerRoute.EXTENSION:
        args = {"input_data_str": calibrated, "disable_per_channel": not per_channel, "fully_quantize": False,
                "inference_type": QUANTIZED_INT8, "input_data_type": IO_TYPES[io],
                "output_data_type": IO_TYPES[output], "enable_numeric_verify": False,
                "enable_whole_model_verify": False, "denylisted_ops": None, "denylisted_nodes": nodes,
                "enable_variable_quantization": False, "disable_per_channel_for_dense_layers": False,
                "debug_options_str": ""}
        quantized = _converter_api().ExperimentalMlirQuantizeModel(*(args[name] for name in MLIR_QUANTIZE_ARGS))
        return _deduplicate_readonly_buffers(quantized)
    import tensorflow as tf
    from tensorflow.lite.python import lite

    dtypes = {"float32": tf.float32, "uint8": tf.uint8, "int8": tf.int8}
    quantized = lite._mlir_quantize(calibrated, not per_channel, input_data_type=dtypes[io],  # noqa: SLF001
                                    output_data_type=dtypes[output], denylisted_nodes=nodes)
    return bytes(lite._deduplicate_readonly_buffers(quantized))  # noqa: SLF001


def disable_per_channel(converter) -> None:
    """Per-tensor weight scales on ``converter``: its only switch for them is the private
    ``_experimental_disable_per_channel``, set here on the pinned TensorFlow once it is seen to exist."""
    ok, why = tf_supported()
    if not ok:
        raise ConversionError(f"cannot use per-tensor weight scales: the converter's private switch for them is {why}")
    if not hasattr(converter, "_experimental_disable_per_channel"):
        raise ConversionError("cannot use per-tensor weight scales: TFLiteConverter._experimental_disable_per_channel "
                              "is gone")
    converter._experimental_disable_per_channel = True  # noqa: SLF001


@contextlib.contextmanager
def fast_freeze(converter):
    """Within this block, ``converter`` freezes its concrete function without re-importing the frozen graph.

    Set on this one converter object, not on TensorFlow's class, so another
    conversion in the process (a thread, a later call) is never affected.
    """
    from tensorflow.lite.python import lite
    from tensorflow.python.framework import convert_to_constants as c2c
    from tensorflow.python.framework import dtypes

    cls = lite.TFLiteFrozenGraphConverterV2
    needed = ("_FunctionConverterDataInEager", "_replace_variables_by_constants")
    if not calibrator_supported()[0] or not all(hasattr(c2c, n) for n in needed) \
            or not isinstance(converter, cls) or not callable(getattr(cls, "_freeze_concrete_function", None)):
        yield False
        return
    stock = cls._freeze_concrete_function  # noqa: SLF001 - read after the version pin and the check above

    class _Frozen:  # what the converter reads of the frozen function: its graph, for Grappler if it runs
        def __init__(self, graph):
            self.graph = graph

    def freeze(self):
        if len(self._funcs) != 1:  # noqa: SLF001 - the stock method words these errors
            return stock(self)
        func = self._funcs[0]  # noqa: SLF001
        data = c2c._FunctionConverterDataInEager(func=func, lower_control_flow=False,  # noqa: SLF001
                                                  aggressive_inlining=False)
        graph_def, converted = c2c._replace_variables_by_constants(converter_data=data)  # noqa: SLF001
        captures = func.graph.internal_captures  # what ``converted`` indexes (see _construct_concrete_function)
        frozen = {id(captures[i]) for i in converted}
        inputs = [t for t in func.inputs if id(t) not in frozen and t.dtype != dtypes.resource]
        return graph_def, inputs, list(func.outputs), _Frozen(func.graph)

    converter._freeze_concrete_function = types.MethodType(freeze, converter)  # noqa: SLF001
    try:
        yield True
    finally:
        del converter._freeze_concrete_function  # noqa: SLF001 - the class's own method again


@contextlib.contextmanager
def fast_calibration(record: dict):
    """Within this block, the converter's calibration step runs ``fast_minmax``.

    ``record`` receives what happened: the calibrator used, or why the stock
    one ran instead. Any failure of the fast path falls back to the stock
    calibrator on the same data, so a conversion never fails because of it.
    """
    ok, why = calibrator_supported()
    if not ok:
        record.update({"calibrator": "stock", "fallback": why})
        yield record
        return
    from tensorflow.lite.python.optimize import calibrator

    stock = calibrator.Calibrator.calibrate

    def calibrate(self, dataset_gen):
        # dataset_gen is the converter's generator function: calling it again replays the samples.
        try:
            with interrupts.surfaced():  # an interrupt is not a failure of the fast path to fall back from
                calibrated, info, _ = fast_minmax(self._model_content, dataset_gen())  # noqa: SLF001
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

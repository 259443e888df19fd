"""Graph rewrites on a converted .tflite that keep XNNPACK in one piece.

Why this exists: in a pre-activation residual network (Xception, ResNet v2)
the ReLU that opens a block reads the sum of the previous residual Add, and
that sum is also the next block's shortcut, so the converter cannot fuse the
ReLU into the Add. In an integer model each such standalone RELU requantizes
(its output scale differs from its input's); XNNPACK does not take quantized
RELU, so every one of them splits the graph into another delegate partition
and runs on a slow reference kernel. On Xception-299 int8 that is 11 RELUs,
12 partitions and 46 ms instead of about 14 ms at 2 threads.

The rewrite (``fuse_shared_add_relu``): each ``RELU(ADD(a, b))`` whose Add
output has other consumers becomes a second ``ADD(a, b)`` with a fused RELU,
writing the RELU's own output tensor, so its quantization (scale, zero point)
is kept. It must be done on the flatbuffer: in Keras a second Add is merged
back into the first by the converter's CSE, even with swapped operands.

The two forms are not always bit-identical: the original rounds a+b to the
Add's scale before the ReLU requantizes it, the fused form rounds once.
``export_tflite`` therefore measures the rewritten model against the original
on the calibration images and records the difference in the manifest. That
check sees 32 images; ``convert --max-drop`` also refuses a rewrite that
changes any top-1 prediction on its eval images: the 32 images cannot see
every such change (measured: on another CPU, a rewrite the check had passed
cost 2 pp on the eval images).
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.core.tf_logs import native_stderr_captured
from pipeline.tflite import flatbuffers
from pipeline.tflite.runtime import delegated_nodes, run_batch

_FUSABLE = {"RELU": "RELU", "RELU6": "RELU6", "RELU_N1_TO_1": "RELU_N1_TO_1"}
_INTEGER_TYPES = {"INT8", "UINT8"}


@dataclass
class RewriteReport:
    name: str
    rewritten: list[dict] = field(default_factory=list)  # {"op", "output", "add_inputs"}

    @property
    def count(self) -> int:
        return len(self.rewritten)

    def to_dict(self) -> dict:
        return {"name": self.name, "count": self.count, "rewritten": self.rewritten}


def fuse_shared_add_relu(model_bytes: bytes) -> tuple[bytes, RewriteReport]:
    """Replace each integer ``RELU(ADD(a, b))`` that blocks fusion by a fused ``ADD(a, b)``.

    Returns the new model bytes and what was rewritten; the input is returned
    unchanged (same bytes) when nothing matches.
    """
    report = RewriteReport("fuse_shared_add_relu")
    model = flatbuffers.read(model_bytes)
    for graph in model.subgraphs:
        producers, _ = _wiring(graph)
        for index, op in enumerate(graph.operators or []):
            name = flatbuffers.op_name(model, op)
            add = _unfused_integer_add(model, graph, op, producers) if name in _FUSABLE else None
            if add is None:
                continue
            graph.operators[index] = _fused_add(add, op, name)
            out = graph.tensors[int(op.outputs[0])]
            report.rewritten.append({"op": name, "output": _text(out.name),
                                     "add_inputs": [int(i) for i in add.inputs]})
    if not report.count:
        return model_bytes, report
    return flatbuffers.write(model), report


def _wiring(graph) -> tuple[dict, dict]:
    """Tensor -> the op producing it, and tensor -> the ops reading it."""
    producer: dict[int, Any] = {}
    consumers: dict[int, list[Any]] = {}
    for op in graph.operators or []:
        for t in op.outputs if op.outputs is not None else []:
            producer[int(t)] = op
        for t in op.inputs if op.inputs is not None else []:
            consumers.setdefault(int(t), []).append(op)
    return producer, consumers


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def _unfused_integer_add(model, graph, relu, producers):
    """The ADD that ``relu`` reads when it has no fused activation and both ends are integer; else None."""
    act = flatbuffers.schema().ActivationFunctionType
    type_names = flatbuffers.type_names()
    source = int(relu.inputs[0])
    add = producers.get(source)
    if add is None or flatbuffers.op_name(model, add) != "ADD":
        return None
    options = add.builtinOptions
    if options is None or options.fusedActivationFunction != act.NONE:
        return None
    out = graph.tensors[int(relu.outputs[0])]
    if type_names.get(graph.tensors[source].type) not in _INTEGER_TYPES \
            or type_names.get(out.type) not in _INTEGER_TYPES:
        return None  # float RELU runs inside XNNPACK already; nothing to gain
    return add


def _fused_add(add, relu, name: str):
    """A copy of ``add`` with the activation ``name`` fused, writing ``relu``'s output."""
    schema = flatbuffers.schema()
    fused = schema.AddOptionsT()
    fused.fusedActivationFunction = getattr(schema.ActivationFunctionType, _FUSABLE[name])
    fused.potScaleInt16 = getattr(add.builtinOptions, "potScaleInt16", True)
    replacement = schema.OperatorT()
    replacement.opcodeIndex = add.opcodeIndex
    replacement.inputs = list(add.inputs)
    replacement.outputs = list(relu.outputs)
    replacement.builtinOptionsType = add.builtinOptionsType
    replacement.builtinOptions = fused
    return replacement


_FREE_SCALE_PRODUCERS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "SUB", "MUL"}
_SAME_SCALE_PRODUCERS = {"MAX_POOL_2D"}  # TFLite requires equal input and output quantization


def raise_negligible_add_inputs(model_bytes: bytes) -> tuple[bytes, RewriteReport]:
    """Coarsen the scale of an Add input that is negligible next to the sum, so XNNPACK takes the Add.

    XNNPACK refuses a quantized ADD whose input-to-output scale ratio is below
    1/1024. Such an input spans less than a quarter of one output quantum, so
    its exact value is lost in the sum's rounding anyway; giving it the scale
    ``out_scale / 1024`` (same zero point, so its range only widens) changes
    the sum by at most a rounding step and keeps the graph in one partition.
    Typical of untrained or freshly initialised residual nets; checked on real
    data by ``export_tflite`` before it is kept.
    """
    type_names = flatbuffers.type_names()
    report = RewriteReport("raise_negligible_add_inputs")
    model = flatbuffers.read(model_bytes)
    for graph in model.subgraphs:
        producer, consumers = _wiring(graph)
        graph_outputs = {int(t) for t in graph.outputs}
        for op in graph.operators or []:
            if flatbuffers.op_name(model, op) not in ("ADD", "SUB"):
                continue
            out_scale = _scale(graph.tensors[int(op.outputs[0])])
            for t in (int(i) for i in op.inputs):
                tensor = graph.tensors[t]
                s = _scale(tensor)
                if s is None or out_scale is None or type_names.get(tensor.type) not in _INTEGER_TYPES:
                    continue
                if s / out_scale >= 1.0 / 1024.0 or t in graph_outputs or t not in producer:
                    continue
                new = _raised_scale(model, graph, consumers.get(t, []))
                chain = _rescalable_chain(model, t, producer, consumers) if new is not None else None
                if chain is None:
                    continue
                for c in chain:
                    graph.tensors[c].quantization.scale = np.asarray([new], dtype=np.float32)
                report.rewritten.append({"tensor": _text(tensor.name), "old_scale": s, "new_scale": new,
                                         "ratio_before": s / out_scale})
    if not report.count:
        return model_bytes, report
    return flatbuffers.write(model), report


def _scale(tensor) -> float | None:
    """The tensor's scale when it has exactly one (per-tensor quantization); else None."""
    q = tensor.quantization
    return float(q.scale[0]) if q is not None and q.scale is not None and len(q.scale) == 1 else None


def _raised_scale(model, graph, readers) -> float | None:
    """The new scale must suit every Add that reads the tensor: just above the largest out_scale / 1024.

    None when a reader is not an Add/Sub, or when the new scale would be 256 times
    some reader's output scale (the other end of XNNPACK's range).
    """
    if any(flatbuffers.op_name(model, r) not in ("ADD", "SUB") for r in readers):
        return None
    new = max(_scale(graph.tensors[int(r.outputs[0])]) or 0.0 for r in readers) / 1024.0 * 1.001
    if any(new / (_scale(graph.tensors[int(r.outputs[0])]) or new) >= 256.0 for r in readers):
        return None
    return new


def _rescalable_chain(model, t: int, producer: dict, consumers: dict) -> list[int] | None:
    """Tensor ``t`` and, through a pool that must keep its input's scale, the tensor above; None if not free."""
    chain = [t]
    source = producer[t]
    if flatbuffers.op_name(model, source) in _SAME_SCALE_PRODUCERS:
        upstream = int(source.inputs[0])
        if len(consumers.get(upstream, [])) != 1 or upstream not in producer \
                or flatbuffers.op_name(model, producer[upstream]) not in _FREE_SCALE_PRODUCERS:
            return None
        chain.append(upstream)
    elif flatbuffers.op_name(model, source) not in _FREE_SCALE_PRODUCERS:
        return None
    return chain


def delegate_partitions(model_bytes: bytes, threads: int = 1) -> int | None:
    """How many pieces XNNPACK cut the model into (1 is the goal; 0 means it took nothing; None: unknown)."""
    return xnnpack_report(model_bytes, threads)["partitions"]


def check_rewrite(stock: bytes, rewritten: bytes, inputs, reference=None, cache: dict | None = None) -> dict:
    """Measure the rewrite on real inputs: against the stock model and, when needed, the float model.

    ``accepted`` is true when every top-1 matches the stock model, or when the
    rewritten model is no further from the float model than the stock one:
    its mean absolute error against the float outputs is no larger (no
    tolerance) and it matches the float model's top-1 on at least as many
    inputs (its single rounding is the more faithful of the two where it
    differs). ``reference`` (the float model's outputs, or a callable giving
    them) is only evaluated when some top-1 differs: on a 299x299 Xception it
    costs more than the check.
    ``cache`` (a dict) keeps each model's outputs between successive checks.
    """


    cache = {} if cache is None else cache

    def outputs(model_bytes):
        key = hashlib.sha256(model_bytes).hexdigest()
        if key not in cache:
            cache[key] = run_batch(model_bytes, inputs)
        return cache[key]

    a, qa = outputs(stock)
    b, qb = outputs(rewritten)
    result: dict[str, Any] = {"samples": int(len(inputs)),
              "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
              "max_abs_quanta": int(np.abs(qa - qb).max()) if qa.dtype.kind in "iu" else None,
              "mean_abs_diff": float(np.abs(a - b).mean())}
    not_worse = False
    if result["top1_agreement"] < 1.0 and reference is not None:
        ref = reference() if callable(reference) else reference
        result["stock_mean_abs_error_vs_float"] = float(np.abs(a - ref).mean())
        result["rewritten_mean_abs_error_vs_float"] = float(np.abs(b - ref).mean())
        result["stock_top1_vs_float"] = float(np.mean(a.argmax(-1) == ref.argmax(-1)))
        result["rewritten_top1_vs_float"] = float(np.mean(b.argmax(-1) == ref.argmax(-1)))
        not_worse = (result["rewritten_mean_abs_error_vs_float"] <= result["stock_mean_abs_error_vs_float"]
                     and result["rewritten_top1_vs_float"] >= result["stock_top1_vs_float"])
    result["accepted"] = bool(result["top1_agreement"] == 1.0 or not_worse)
    return result


# XNNPACK refuses a quantized ADD/SUB whose input-to-output scale ratio is outside [1/1024, 256)
# (CheckTensorsInputOutputScale in the TFLite XNNPACK delegate).
_ADD_SCALE_RANGE = (1.0 / 1024.0, 256.0)


def xnnpack_report(model_bytes: bytes, threads: int = 1) -> dict:
    """See ``_xnnpack_report``; memoised by content, as building XNNPACK for a 22M-weight model takes a second."""

    key = hashlib.sha256(model_bytes).hexdigest()
    if key not in _REPORTS:
        if len(_REPORTS) > 8:
            _REPORTS.clear()
        _REPORTS[key] = _xnnpack_report(model_bytes, threads)
    return copy.deepcopy(_REPORTS[key])


_REPORTS: dict[str, dict] = {}


def _xnnpack_report(model_bytes: bytes, threads: int = 1) -> dict:
    """Which ops XNNPACK left out, and the likely reason for each.

    A node is outside the delegate when its output feeds a DELEGATE node but
    is produced by none. The reasons name what a user can act on: a quantized
    RELU that could not be fused, or an Add whose scales XNNPACK refuses
    (typical of untrained or badly calibrated models, where a residual branch
    is a thousand times smaller than the sum).
    """
    from ai_edge_litert.interpreter import Interpreter


    with native_stderr_captured() as log:
        interpreter = Interpreter(model_content=model_bytes, num_threads=threads)
        try:
            interpreter.allocate_tensors()
        except RuntimeError as exc:  # XNNPACK refuses the whole graph (measured: extreme requantization scales)
            refused = re.sub(r"(?<=[a-z])(?=Node number)", "; ", str(exc).strip().splitlines()[0][:200]) or log.tail(1)
            return {"partitions": 0, "outside": [], "refused": refused}
    nodes, why = delegated_nodes(interpreter)
    if nodes is None:
        return {"partitions": None, "outside": [], "unknown": why}
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    delegate_in: set[int] = set()
    delegate_out: set[int] = set()
    partitions = 0
    for node in nodes:
        if node["op_name"] == "DELEGATE":
            partitions += 1
            delegate_in.update(int(i) for i in node["inputs"])
            delegate_out.update(int(o) for o in node["outputs"])
    outside = []
    for node in nodes:
        if node["op_name"] == "DELEGATE" or not partitions:
            continue
        outs = {int(o) for o in node["outputs"]}
        if outs <= delegate_out or not (outs & delegate_in):
            continue
        outside.append(_outside_entry(node, tensors.get(next(iter(outs)), {}), tensors))
    return {"partitions": partitions, "outside": outside}


def _outside_entry(node: dict, out: dict, tensors: dict) -> dict:
    """One node left out of XNNPACK (``out``: its first output's details) and the likely reason."""
    entry = {"op": node["op_name"], "output": out.get("name", "?"), "reason": "not supported by XNNPACK"}
    if node["op_name"] in ("RELU", "RELU6", "RELU_N1_TO_1"):
        entry["reason"] = "standalone quantized activation (XNNPACK has no integer RELU)"
    elif node["op_name"] in ("ADD", "SUB"):
        out_scale = out.get("quantization", (0.0, 0))[0]
        ratios = [tensors[int(i)]["quantization"][0] / out_scale for i in node["inputs"]
                  if int(i) in tensors and out_scale]
        bad = [r for r in ratios if not (_ADD_SCALE_RANGE[0] <= r < _ADD_SCALE_RANGE[1])]
        if bad:
            entry["reason"] = (f"input/output scale ratio {min(bad):.2g} outside XNNPACK's [1/1024, 256): "
                               "one input is negligible next to the sum (untrained or badly calibrated?)")
    return entry

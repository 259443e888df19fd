"""Whether a model's output already is a probability (softmax, sigmoid) or a logit, read from the model's graph.

Decided from the model, never from the values: an int8 softmax over 1000
classes rounds most entries to zero, so its rows sum to well under 1 (0.54
to 1.0 on an ImageNet classifier) and a test of the sums took them for
logits. One reader per format, each walking back from the output past the
ops that only move or requantize values (reshape, flatten, squeeze,
identity, a linear activation, dropout at inference, (de)quantize) to the op
that computes them. The two sides must agree on the same model: a softmax
followed by a reshape is probabilities in the Keras model and in its
``.tflite``, where the reshape is a RESHAPE op. The Keras reader is the model
stage's (``pipeline.model.keras_output``), which the stem fold uses too.
"""

from __future__ import annotations

from typing import Any

from pipeline.model.keras_output import OutputKind, through
from pipeline.tflite import flatbuffers


# ---------------------------------------------------------------- .tflite

# Ops that pass their input through unchanged up to quantization or shape.
TFLITE_SHAPE_ONLY = {"DEQUANTIZE", "QUANTIZE", "RESHAPE", "SQUEEZE", "EXPAND_DIMS"}
TFLITE_PROBABILITY_OPS = {"SOFTMAX", "LOGISTIC"}


def tflite_output_kind(model_bytes: bytes) -> OutputKind:
    """The op producing the .tflite's output, past the shape-only ops, read in place."""
    model = flatbuffers.schema().Model.GetRootAs(model_bytes, 0)
    graph = model.Subgraphs(0)
    names = flatbuffers.op_names()
    producer: dict[int, Any] = {}
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        for j in range(op.OutputsLength()):
            producer[int(op.Outputs(j))] = op
    tensor, passed = int(graph.Outputs(0)), list[str]()
    for _ in range(graph.OperatorsLength()):
        op = producer.get(tensor)
        if op is None:
            break
        code = model.OperatorCodes(op.OpcodeIndex())
        name = names.get(flatbuffers.builtin_code(code), "CUSTOM")
        if name in TFLITE_PROBABILITY_OPS:
            return OutputKind(True, f"{name} op produces the output{through(passed)}")
        if name not in TFLITE_SHAPE_ONLY or not op.InputsLength():
            return OutputKind(False, f"the output comes from {name}{through(passed)}, not from a SOFTMAX or "
                                     "LOGISTIC op")
        passed.append(name)
        tensor = int(op.Inputs(0))
    return OutputKind(False, "no SOFTMAX or LOGISTIC op produces the output")


# ---------------------------------------------------------------- SavedModel signatures

TF_SHAPE_ONLY = {"Identity", "Reshape", "Squeeze", "ExpandDims"}
TF_PROBABILITY_OPS = {"Softmax", "Sigmoid"}
_TF_CALLS = {"StatefulPartitionedCall", "PartitionedCall"}


def _tf_ref(ref: str) -> tuple[str, int]:
    """``node``, ``node:k`` (a graph) or ``node:arg:k`` (a function body) -> (node, k)."""
    parts = ref.split(":")
    return parts[0], int(parts[-1]) if len(parts) > 1 else 0


def saved_model_output_kind(signature) -> OutputKind:
    """The op producing a SavedModel signature's output, followed through shape-only ops and function calls."""
    graph_def = signature.graph.as_graph_def()
    functions = {f.signature.name: f for f in graph_def.library.function}
    nodes = {n.name: n for n in graph_def.node}
    name, index = _tf_ref(signature.outputs[0].name)
    for _ in range(10_000):
        node = nodes.get(name)
        if node is None:  # a function's argument, a placeholder
            break
        if node.op in TF_PROBABILITY_OPS:
            return OutputKind(True, f"a {node.op} op produces the serving output")
        if node.op in _TF_CALLS and node.attr["f"].func.name in functions:
            function = functions[node.attr["f"].func.name]
            nodes = {n.name: n for n in function.node_def}
            name, index = _tf_ref(function.ret[function.signature.output_arg[index].name])
        elif node.op in TF_SHAPE_ONLY and node.input:
            name, index = _tf_ref(node.input[0])
        else:
            return OutputKind(False, f"the serving output comes from a {node.op} op, not Softmax or Sigmoid")
    return OutputKind(False, "no Softmax or Sigmoid op produces the serving output")

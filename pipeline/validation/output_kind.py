"""Whether a model's output already is a probability (softmax, sigmoid) or a logit, read from the model's graph.

Decided from the model, never from the values: an int8 softmax over 1000
classes rounds most entries to zero, so its rows sum to well under 1 (0.54
to 1.0 on an ImageNet classifier) and a test of the sums took them for
logits. One reader per format, each walking back from the output past the
ops that only move or requantize values (reshape, flatten, squeeze,
identity, a linear activation, dropout at inference, (de)quantize) to the op
that computes them. The two sides must agree on the same model: a softmax
followed by a reshape is probabilities in the Keras model and in its
``.tflite``, where the reshape is a RESHAPE op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.tflite import flatbuffers


@dataclass(frozen=True)
class OutputKind:
    """Whether a model's output already is a probability, and what in the model says so."""

    probabilities: bool
    evidence: str

    def describe(self) -> str:
        if self.probabilities:
            return f"probabilities ({self.evidence})"
        return f"logits ({self.evidence}; softmax applied)"


def _through(passed: list[str]) -> str:
    """`` (through A, B)``: the shape-only ops between the producer and the output, producer side first."""
    return f" (through {', '.join(reversed(passed))})" if passed else ""


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
            return OutputKind(True, f"{name} op produces the output{_through(passed)}")
        if name not in TFLITE_SHAPE_ONLY or not op.InputsLength():
            return OutputKind(False, f"the output comes from {name}{_through(passed)}, not from a SOFTMAX or "
                                     "LOGISTIC op")
        passed.append(name)
        tensor = int(op.Inputs(0))
    return OutputKind(False, "no SOFTMAX or LOGISTIC op produces the output")


# ---------------------------------------------------------------- Keras (3 and tf_keras), from the configuration

# Layers and operations (Keras 3's keras.ops, tf_keras's TFOpLambda functions) that only move values.
KERAS_SHAPE_ONLY = {"Reshape", "Flatten", "Identity", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
                    "SpatialDropout3D", "GaussianDropout", "GaussianNoise", "AlphaDropout", "ActivityRegularization",
                    "Squeeze", "ExpandDims"}
KERAS_SHAPE_ONLY_FUNCTIONS = {"reshape", "squeeze", "expand_dims", "identity", "compat.v1.squeeze"}
KERAS_PROBABILITY_ACTIVATIONS = {"softmax", "sigmoid"}
# Layers and operations that are an activation by their class: Keras 3's keras.ops.softmax is a Softmax operation.
_ACTIVATION_CLASSES = {"Softmax": "softmax", "Sigmoid": "sigmoid", "ReLU": "relu", "LeakyReLU": "leaky_relu"}
_FUNCTION_ACTIVATIONS = {"nn.softmax": "softmax", "math.softmax": "softmax", "nn.sigmoid": "sigmoid",
                         "math.sigmoid": "sigmoid", "sigmoid": "sigmoid"}


def _activation_name(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # Keras 3 {"class_name": "function", "config": "softmax"}; tfmot's wrapped activation
        inner = value.get("config")
        return inner if isinstance(inner, str) else _activation_name((inner or {}).get("activation"))
    return None


def _layer_activation(class_name: str | None, config: dict) -> str | None:
    if class_name in _ACTIVATION_CLASSES:
        return _ACTIVATION_CLASSES[class_name]
    if class_name == "TFOpLambda":
        return _FUNCTION_ACTIVATIONS.get(str(config.get("function")))
    if "activation" in config:
        return _activation_name(config["activation"])
    inner = config.get("layer")  # wrappers (tfmot's QuantizeWrapper) hold the wrapped layer's config
    if isinstance(inner, dict):
        return _layer_activation(inner.get("class_name"), inner.get("config") or {})
    return None


def _shape_only(class_name: str | None, config: dict) -> bool:
    if class_name in KERAS_SHAPE_ONLY:
        return True
    if class_name == "TFOpLambda":
        return config.get("function") in KERAS_SHAPE_ONLY_FUNCTIONS
    return class_name == "Activation" and _activation_name(config.get("activation")) == "linear"


def _history(value) -> tuple[str, int] | None:
    """The first (layer name, node index) a config's inbound node refers to, in Keras 3's or tf_keras's form."""
    if isinstance(value, dict):
        history = (value.get("config") or {}).get("keras_history") if value.get("class_name") == "__keras_tensor__" \
            else None
        if isinstance(history, (list, tuple)) and history and isinstance(history[0], str):
            return history[0], int(history[1]) if len(history) > 1 else 0
        value = value.get("args", [])
    if isinstance(value, (list, tuple)):
        if len(value) >= 3 and isinstance(value[0], str) and isinstance(value[1], int):  # tf_keras [name, node, t, kw]
            return value[0], value[1]
        for item in value:
            found = _history(item)
            if found is not None:
                return found
    return None


def _chain(config: dict):
    """(class name, config, name) of the layers from a model's output backwards, following each one's input."""
    layers = config.get("layers") or []
    if "output_layers" not in config:  # Sequential: the layers are the chain
        for entry in reversed(layers):
            yield entry.get("class_name"), entry.get("config") or {}, (entry.get("config") or {}).get("name")
        return
    by_name = {entry.get("name") or (entry.get("config") or {}).get("name"): entry for entry in layers}
    ref = _history(config["output_layers"])
    for _ in range(len(layers)):
        if ref is None:
            return
        name, node = ref
        entry = by_name.get(name)
        if entry is None:
            return
        yield entry.get("class_name"), entry.get("config") or {}, name
        nodes = entry.get("inbound_nodes") or []
        ref = _history(nodes[node] if node < len(nodes) else nodes[:1])


def keras_config_output_kind(config: dict) -> OutputKind:
    """The activation that produces a Keras model's output (``get_config()``), past the shape-only layers."""
    passed: list[str] = []
    for class_name, layer_config, name in _chain(config):
        if "layers" in layer_config:  # a nested model: its own output
            kind = keras_config_output_kind(layer_config)
            return OutputKind(kind.probabilities, kind.evidence + _through(passed))
        where = f"the layer {name!r}" if passed else f"the output layer {name!r}"
        activation = _layer_activation(class_name, layer_config)
        if activation in KERAS_PROBABILITY_ACTIVATIONS:
            return OutputKind(True, f"{where} has a {activation} activation{_through(passed)}")
        if class_name == "InputLayer" or not _shape_only(class_name, layer_config):
            return OutputKind(False, f"{where} has activation {activation or 'none'!r}{_through(passed)}, not "
                                     "softmax or sigmoid")
        passed.append(f"{class_name} {name!r}")
    return OutputKind(False, "no layer with a softmax or sigmoid activation produces the output")


def keras_output_kind(model) -> OutputKind:
    """``keras_config_output_kind`` of a loaded model; a subclassed model (no config) by its last layer's."""
    try:
        config = model.get_config()
    except NotImplementedError:
        config = None
    if not isinstance(config, dict) or not config.get("layers"):
        layer = model.layers[-1]
        config = {"layers": [{"class_name": type(layer).__name__, "config": layer.get_config()}]}
    return keras_config_output_kind(config)


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

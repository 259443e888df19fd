"""Whether a Keras model's output already is a probability (softmax, sigmoid) or a logit, read from its config.

Decided from the model, never from the values: an int8 softmax over 1000
classes rounds most entries to zero, so its rows sum to well under 1 (0.54
to 1.0 on an ImageNet classifier) and a test of the sums took them for
logits. The reader walks back from the output past the layers that only move
values (reshape, flatten, squeeze, identity, a linear activation, dropout at
inference) to the layer that computes them. It lives in the model stage,
where the stem fold first needs it (``pipeline.model.stem`` compares
probabilities); ``pipeline.validation.output_kind`` reads .tflite and
SavedModel outputs the same way and uses this one for Keras models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OutputKind:
    """Whether a model's output already is a probability, and what in the model says so."""

    probabilities: bool
    evidence: str

    def describe(self) -> str:
        if self.probabilities:
            return f"probabilities ({self.evidence})"
        return f"logits ({self.evidence}; softmax applied)"


def through(passed: list[str]) -> str:
    """`` (through A, B)``: the shape-only ops between the producer and the output, producer side first."""
    return f" (through {', '.join(reversed(passed))})" if passed else ""


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
            return OutputKind(kind.probabilities, kind.evidence + through(passed))
        where = f"the layer {name!r}" if passed else f"the output layer {name!r}"
        activation = _layer_activation(class_name, layer_config)
        if activation in KERAS_PROBABILITY_ACTIVATIONS:
            return OutputKind(True, f"{where} has a {activation} activation{through(passed)}")
        if class_name == "InputLayer" or not _shape_only(class_name, layer_config):
            return OutputKind(False, f"{where} has activation {activation or 'none'!r}{through(passed)}, not "
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


def keras_probabilities(model, out) -> np.ndarray:
    """A Keras model's outputs as probabilities: as they are when ``keras_output_kind`` says they are, else
    their softmax."""
    out = np.asarray(out, dtype=np.float64)
    if keras_output_kind(model).probabilities:
        return out
    e = np.exp(out - out.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)

"""A transfer-learning model with its base network inlined: one flat Keras graph of leaf layers.

Why: ``x = base(inputs, training=False)`` makes the whole base network one
layer of the outer model. Converted as it is, every tensor of the base is
named after that one layer (``model_1/xception_1/block4_sepconv2_1/...``),
so the per-layer error, ``xedge diff`` and the float fallback see one layer
called ``xception`` instead of its 100; and the stem convolution that the
input scaling folds into is hidden inside it. Inlined, the base's layers
keep their own names (``block4_sepconv2``) and the stem is the first layer.

The graph is rebuilt by calling the same layer objects on new symbolic
tensors, in the order the models' own Keras configs wire them, then cloned
with its weights (so no layer belongs to both models); a nested model's call arguments (``training``)
are dropped, as they only matter for training. A leaf layer whose name an
earlier one already took is cloned under ``<nested model>_<name>``. Keras 3
and tf_keras (Keras 2) models alike: each is rebuilt with the Keras that
built it, read from its own config (Keras 3 nodes hold their call arguments
with ``keras_history`` references; tf_keras nodes are lists of
``[layer, node, tensor, kwargs]``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Substitute = (layer, input tensors) -> output tensor: what ``rebuild`` calls instead of a layer.
Substitute = Callable[[object, list], object]


def _keras():
    import keras

    return keras


def keras_of(model):
    """The Keras that built ``model``: Keras 3, or tf_keras (Keras 2) for the models it loads."""
    if type(model).__module__.startswith("tf_keras"):
        import tf_keras

        return tf_keras
    return _keras()


def is_model(layer) -> bool:
    """Whether ``layer`` is a Functional or Sequential model (Keras 3 or tf_keras) rather than a leaf layer."""
    return isinstance(layer, keras_of(layer).Model)


def nested_models(model) -> list[str]:
    """Names of the Functional or Sequential models inside ``model`` (at any depth)."""
    found: list[str] = []
    for layer in getattr(model, "layers", []):
        if is_model(layer):
            found += [layer.name, *nested_models(layer)]
    return found


def _entry_name(entry: dict) -> str:
    return str((entry.get("config") or {}).get("name") or entry.get("name"))


def _refs(value) -> list[tuple]:
    """The (layer, node, tensor) histories of every Keras tensor in a config's call arguments."""
    if isinstance(value, dict):
        history = (value.get("config") or {}).get("keras_history") if value.get("class_name") == (
            "__keras_tensor__") else None
        if history is not None:
            return [tuple(history)]
        return [ref for v in value.values() for ref in _refs(v)]
    if isinstance(value, (list, tuple)):
        return [ref for v in value for ref in _refs(v)]
    return []


def _fill(value, computed: dict):
    """The call arguments with each Keras tensor's config replaced by the tensor computed for it."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            return computed[tuple(value["config"]["keras_history"])]
        return {k: _fill(v, computed) for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # a live config holds tuples, a saved one lists
        return [_fill(v, computed) for v in value]
    return value


def _is_entry(value) -> bool:
    """A tf_keras node entry: ``[layer name, node index, tensor index]`` with optional call keyword arguments."""
    return (isinstance(value, (list, tuple)) and len(value) in (3, 4) and isinstance(value[0], str)
            and isinstance(value[1], int) and isinstance(value[2], int))


def _node_refs(node) -> list[tuple]:
    """The (layer, node, tensor) histories a call node reads: Keras 3's dict or tf_keras's entries."""
    if isinstance(node, dict):
        return _refs(node)
    if _is_entry(node):
        return [tuple(node[:3])]
    return [ref for value in node for ref in _node_refs(value)] if isinstance(node, (list, tuple)) else []


def _node_call(node, computed: dict) -> tuple[list, dict]:
    """The positional and keyword arguments of one call node, its tensors replaced by the computed ones.

    A tf_keras node is the structure of entries the layer was called on (a list of them, or one entry for a
    TFOpLambda); as tf_keras itself does, a list of one tensor is called as the tensor, with the keyword
    arguments of the last entry (a TFOpLambda's ``y``, a nested model's ``training``)."""
    if isinstance(node, dict):
        return _fill(node.get("args") or [], computed), _fill(node.get("kwargs") or {}, computed)
    kwargs: dict = {}

    def fill(value):
        nonlocal kwargs
        if _is_entry(value):
            kwargs = dict(value[3]) if len(value) > 3 and value[3] else {}
            return computed[tuple(value[:3])]
        return [fill(v) for v in value] if isinstance(value, (list, tuple)) else value

    structure = fill(node)
    if isinstance(structure, list) and len(structure) == 1:
        structure = structure[0]
    return [structure], kwargs


def _histories(value) -> list[tuple]:
    """``input_layers``/``output_layers`` of a config: one [name, node, tensor] or a list of them."""
    if value and isinstance(value[0], str):
        return [tuple(value)]
    return [tuple(v) for v in value]


class _Builder:
    """One rebuild: the names taken so far, the layer objects used, and the substitutions."""

    def __init__(self, substitute: dict[str, Substitute]):
        self.substitute = substitute
        self.taken: set[str] = set()
        self.chosen: dict[int, Any] = {}

    def leaf(self, layer, parent: str | None, args: list, kwargs: dict):
        """``layer`` called on ``args``: itself, or a clone under another name (same weights) when an earlier
        layer of the flat graph already has its name."""
        use = self.chosen.get(id(layer))
        fresh = use is None and layer.name in self.taken
        if use is None:
            use = type(layer).from_config({**layer.get_config(), "name": f"{parent}_{layer.name}"}) if fresh else layer
            self.taken.add(use.name)
            self.chosen[id(layer)] = use
        out = use(*args, **kwargs)
        if fresh and getattr(layer, "weights", None):
            use.set_weights(layer.get_weights())
        return out

    def call(self, layer, args: list, kwargs: dict, parent: str | None) -> list:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("training", "mask")}
        if is_model(layer):
            tensors = [t for t in _flat(args)]
            return self.walk(layer, tensors)
        if layer.name in self.substitute:
            out = self.substitute[layer.name](layer, _flat(args))
        else:
            out = self.leaf(layer, parent, args, kwargs)
        return _flat(out)

    def walk(self, model, inputs: list) -> list:
        """The outputs of ``model`` called on ``inputs``, leaf layer by leaf layer."""
        if isinstance(model, keras_of(model).Sequential):
            x = inputs
            for layer in model.layers:
                x = self.call(layer, list(x), {}, model.name)
            return x
        config = model.get_config()
        # Operations, not only layers: ``x + 3.0`` in a builder (MobileNetV3's hard sigmoid) is an op node
        # (tf_keras makes it a TFOpLambda layer).
        operations = {op.name: op for op in getattr(model, "operations", None) or model.layers}
        computed = dict(zip(_histories(config["input_layers"]), inputs))
        first = _first_node_index(config)
        pending = [(entry, first.get(_entry_name(entry), 0) + i, node) for entry in config["layers"]
                   if entry.get("class_name") != "InputLayer"
                   for i, node in enumerate(entry.get("inbound_nodes") or [])]
        while pending:
            ready = [p for p in pending if all(ref in computed for ref in _node_refs(p[2]))]
            if not ready:
                raise ValueError(f"cannot order the layers of {model.name} from its config")
            for entry, index, node in ready:
                name = _entry_name(entry)
                outputs = self.call(operations[name], *_node_call(node, computed), model.name)
                for k, tensor in enumerate(outputs):
                    computed[(name, index, k)] = tensor
            pending = [p for p in pending if p not in ready]
        return [computed[h] for h in _histories(config["output_layers"])]


def _first_node_index(config: dict) -> dict[str, int]:
    """The index that each layer's first saved call node has in the references to it.

    0, except where a config leaves out a layer's first node: tf_keras does for a nested model built on its own
    Input (that node links the model's inputs to its outputs and belongs to no outer graph), and numbers the
    saved calls from 1. Every saved node is read by a later one or is an output, so the highest index referred
    to is the last saved node's."""
    highest: dict[str, int] = {}
    nodes = [node for entry in config["layers"] for node in entry.get("inbound_nodes") or []]
    for name, index, _ in [ref for node in nodes for ref in _node_refs(node)] + _histories(config["output_layers"]):
        highest[name] = max(highest.get(name, 0), int(index))
    return {name: max(0, highest.get(name, 0) - (len(entry.get("inbound_nodes") or []) - 1))
            for entry in config["layers"] for name in [_entry_name(entry)]}


def _flat(value) -> list:
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat(v)]
    return [value]


def rebuild(model, substitute: dict[str, Substitute] | None = None, input_dtype: str = "float32"):
    """``model`` as one flat Functional model of leaf layers, with the named layers replaced by ``substitute``."""
    keras = keras_of(model)
    shape = tuple(model.inputs[0].shape[1:])
    inputs = keras.Input(shape, dtype=input_dtype)
    outputs = _Builder(substitute or {}).walk(model, [inputs])
    return keras.Model(inputs, outputs[0] if len(outputs) == 1 else outputs, name=model.name)


def flatten(model):
    """``model`` with every nested model inlined (module docstring); ``model`` itself when nothing is nested.

    The result is cloned, weights copied: its layers belong to it alone, so ``layer.output`` is its own."""
    if not nested_models(model):
        return model
    rebuilt = rebuild(model)
    flat = keras_of(rebuilt).models.clone_model(rebuilt)
    flat.set_weights(rebuilt.get_weights())
    return flat

"""The [-1, 1] input scaling folded into a Keras model's first convolution, so the model takes pixels.

Why: a quantized input of scale 2/255 puts every pixel exactly halfway
between two levels (p - 128.5), so float error decides which way each one
rounds and 256 pixel values become 215 levels. A model that takes the pixels
themselves has an input of scale 1: each value its own level, and a device
feeds camera bytes with no arithmetic.

For a valid-padding convolution, conv(p / 127.5 - 1; w) = conv(p; w / 127.5)
- sum(w) per output channel: the kernel is divided by 127.5 and sum(w) is
subtracted from the bias, or added to the moving mean of the
BatchNormalization after it (Xception's stem: no bias, BatchNorm). Exact up
to float rounding. With "same" padding the convolution's zero pad in [-1, 1]
is pixel 127.5, which no uint8 value is: such a model (users' models, for
example) is not folded, ``fold_plan`` says why, and it keeps [-1, 1] input.
"""

from __future__ import annotations

import numpy as np

PIXEL_SCALE = 127.5  # the training input is p / 127.5 - 1 (pipeline.core.preprocessing.scale)


def _inbound(layer: dict) -> list[str]:
    """Names of the layers feeding ``layer`` in a functional config (Keras 3 ``keras_history`` or tf_keras lists)."""
    found: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            config = node.get("config")
            history = config.get("keras_history") if isinstance(config, dict) else None
            if isinstance(history, (list, tuple)) and history and isinstance(history[0], str):
                found.append(history[0])
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):  # a live config holds tuples, a saved one lists
            if len(node) >= 3 and isinstance(node[0], str) and isinstance(node[1], int):
                found.append(node[0])  # tf_keras: [layer name, node index, tensor index, kwargs]
                return
            for value in node:
                walk(value)

    walk(layer.get("inbound_nodes") or [])
    return found


def _consumers(config: dict) -> tuple[dict[str, dict], dict[str, list[str]], list[str]]:
    """Layers by name, each layer's consumers, and the input layers, from a Sequential or functional config."""
    layers = config.get("layers") or []
    by_name = {(entry.get("config") or {}).get("name") or entry.get("name"): entry for entry in layers}
    consumers: dict[str, list[str]] = {name: [] for name in by_name}
    inputs = [name for name, entry in by_name.items() if entry.get("class_name") == "InputLayer"]
    if layers and all("inbound_nodes" not in entry for entry in layers):  # Sequential: a chain
        names = list(by_name)
        if not inputs:
            inputs = ["<input>"]
            names = inputs + names
            consumers["<input>"] = []
        for a, b in zip(names, names[1:]):
            consumers[a].append(b)
        return by_name, consumers, inputs
    for name, entry in by_name.items():
        for source in dict.fromkeys(_inbound(entry)):
            consumers.setdefault(source, []).append(name)
    return by_name, consumers, inputs


def _first_conv(config: dict) -> tuple[str, dict, dict, dict] | str:
    """(name, config, layers by name, consumers) of the one convolution the input feeds, or why there is none."""
    by_name, consumers, inputs = _consumers(config)
    if len(inputs) != 1:
        return f"the model has {len(inputs)} input layers"
    first = consumers.get(inputs[0], [])
    if len(first) != 1:
        return f"the input feeds {len(first)} layers, not one convolution"
    conv = by_name[first[0]]
    if conv.get("class_name") != "Conv2D":
        return f"the first layer ({first[0]}) is a {conv.get('class_name')}, not a Conv2D"
    return first[0], conv.get("config") or {}, by_name, consumers


def fold_plan(config: dict) -> tuple[str, str | None] | str:
    """Where the [-1, 1] scaling can be folded, read from a Keras model config.

    Returns ``(conv, bn)`` (the first convolution and the BatchNormalization
    whose moving mean takes the offset, or None when the convolution's own bias
    does) or, when it cannot be folded exactly, the reason as a string.
    """
    found = _first_conv(config)
    if isinstance(found, str):
        return found
    name, cfg, by_name, consumers = found
    if cfg.get("data_format") not in (None, "channels_last"):
        return f"the first convolution ({name}) is channels_first"
    if cfg.get("padding") != "valid":
        return (f"the first convolution ({name}) has {cfg.get('padding')!r} padding: its zero pad in [-1, 1] "
                "is pixel 127.5, which no uint8 pixel is, so the fold would not be exact")
    if cfg.get("use_bias"):
        return name, None
    if cfg.get("activation") not in (None, "linear"):
        return f"the first convolution ({name}) has no bias and a {cfg.get('activation')} activation"
    after = consumers.get(name, [])
    if len(after) != 1 or by_name[after[0]].get("class_name") != "BatchNormalization":
        return f"the first convolution ({name}) has no bias and no single BatchNormalization after it"
    axis = (by_name[after[0]].get("config") or {}).get("axis")
    if axis not in (-1, 3, [-1], [3]):
        return f"the BatchNormalization after {name} normalizes axis {axis}, not the channels"
    return name, after[0]


def fold_input_scaling(model):
    """A copy of ``model`` that takes pixels p in [0, 255] where ``model`` takes p / 127.5 - 1 (module docstring)."""
    plan = fold_plan(model.get_config())
    if isinstance(plan, str):
        raise ValueError(f"cannot fold the input scaling into {model.name}: {plan}")
    conv_name, bn_name = plan
    if type(model).__module__.startswith("tf_keras"):
        import tf_keras as keras_module
    else:
        import keras as keras_module
    folded = keras_module.models.clone_model(model)
    folded.set_weights(model.get_weights())
    conv = folded.get_layer(conv_name)
    weights = conv.get_weights()
    kernel = np.asarray(weights[0], dtype=np.float64)
    offset = kernel.sum(axis=(0, 1, 2))  # per output channel (the last kernel axis)
    weights[0] = (kernel / PIXEL_SCALE).astype(weights[0].dtype)
    if bn_name is None:
        weights[1] = (np.asarray(weights[1], dtype=np.float64) - offset).astype(weights[1].dtype)
        conv.set_weights(weights)
        return folded
    conv.set_weights(weights)
    bn = folded.get_layer(bn_name)
    mean = np.asarray(bn.moving_mean.numpy() if hasattr(bn.moving_mean, "numpy") else bn.moving_mean,
                      dtype=np.float64)
    bn.moving_mean.assign((mean + offset).astype(np.float32))
    return folded

"""A Keras 3 Xception rebuilt in tf_keras (Keras 2), the only Keras that tensorflow-model-optimization uses.

tfmot 0.8.1 picks tf_keras itself whenever ``tf.keras`` is Keras 3
(``tfmot/python/core/keras/compat.py``), so Keras 3 models cannot be wrapped
directly; they are translated layer by layer from their functional config and
their weights copied.

Each ``SeparableConv2D`` becomes ``DepthwiseConv2D`` (``<name>_depthwise``)
followed by a 1x1 ``Conv2D`` that keeps the original name. That is what the
TFLite converter emits for a separable conv anyway (DEPTHWISE_CONV_2D +
CONV_2D), and it sidesteps three upstream QAT failures with separable convs:
bias-less SeparableConv2D breaking ``quantize_model``
(tensorflow/model-optimization#655), and QAT models with separable convs that
cannot be saved or converted (#823, #964). Every other layer keeps its name,
so per-layer reports still point at ``block7_sepconv2_bn`` and friends.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.errors import ModelLoadError

SUPPORTED = ("InputLayer", "Conv2D", "SeparableConv2D", "DepthwiseConv2D", "BatchNormalization", "Activation",
             "ReLU", "MaxPooling2D", "AveragePooling2D", "Add", "GlobalAveragePooling2D", "Dense")


def _inputs_of(entry: dict) -> list[str]:
    names: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("class_name") == "__keras_tensor__":
                names.append(node["config"]["keras_history"][0])
                return
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    for inbound in entry.get("inbound_nodes", []):
        walk(inbound.get("args", []))
    return names


def _endpoints(spec) -> list[str]:
    """``["image", 0, 0]`` or ``[["a", 0, 0], ["b", 0, 0]]`` -> layer names."""
    return [spec[0]] if isinstance(spec[0], str) else [s[0] for s in spec]


def _activation(cfg: dict):
    act = cfg.get("activation", "linear")
    if not isinstance(act, str):
        raise ModelLoadError(f"layer {cfg.get('name')!r}: only named activations can be translated, got {act!r}")
    return act


def translate(model):
    """A tf_keras functional model with the same computation and (split) weights as the Keras 3 ``model``."""
    import tf_keras

    config = model.get_config()
    tensors: dict[str, object] = {}
    copies: list[tuple[str, Any, list[int] | None]] = []  # (keras3 layer name, tf_keras layer, weight indices)
    for entry in config["layers"]:
        cls, cfg, name = entry["class_name"], entry["config"], entry["name"]
        if cls not in SUPPORTED:
            raise ModelLoadError(f"layer {name!r} ({cls}) cannot be prepared for quantization-aware training; "
                                 "QAT takes models built by this tool's Xception builder")
        if cls == "InputLayer":
            tensors[name] = tf_keras.Input(shape=tuple(cfg["batch_shape"][1:]), name=name)
            continue
        args = [tensors[n] for n in _inputs_of(entry)]
        tensors[name] = _apply_twin(cls, cfg, name, args if cls == "Add" else args[0], copies)
    inputs = [tensors[n] for n in _endpoints(config["input_layers"])]
    outputs = [tensors[n] for n in _endpoints(config["output_layers"])]
    twin = tf_keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs[0] if len(outputs) == 1 else outputs,
                          name=model.name)
    for source_name, layer, indices in copies:
        weights = model.get_layer(source_name).get_weights()
        layer.set_weights(weights if indices is None else [weights[i] for i in indices])
    return twin


def _apply_twin(cls: str, cfg: dict, name: str, x, copies: list):
    """The tf_keras twin of one Keras 3 layer applied to ``x``; layers with weights are added to ``copies``."""
    from tf_keras import layers

    conv = dict(kernel_size=cfg.get("kernel_size"), strides=cfg.get("strides"), padding=cfg.get("padding"))
    if cls == "Conv2D":
        layer = layers.Conv2D(cfg["filters"], **conv, use_bias=cfg["use_bias"], activation=_activation(cfg),
                              dilation_rate=cfg["dilation_rate"], name=name)
        copies.append((name, layer, None))
    elif cls == "SeparableConv2D":
        depthwise = layers.DepthwiseConv2D(**conv, depth_multiplier=cfg["depth_multiplier"], use_bias=False,
                                           dilation_rate=cfg["dilation_rate"], name=f"{name}_depthwise")
        x = depthwise(x)
        copies.append((name, depthwise, [0]))
        layer = layers.Conv2D(cfg["filters"], 1, use_bias=cfg["use_bias"], activation=_activation(cfg), name=name)
        copies.append((name, layer, [1, 2] if cfg["use_bias"] else [1]))
    elif cls == "DepthwiseConv2D":
        layer = layers.DepthwiseConv2D(**conv, depth_multiplier=cfg["depth_multiplier"], use_bias=cfg["use_bias"],
                                       activation=_activation(cfg), name=name)
        copies.append((name, layer, None))
    elif cls == "BatchNormalization":
        layer = layers.BatchNormalization(axis=cfg["axis"], momentum=cfg["momentum"], epsilon=cfg["epsilon"],
                                          center=cfg["center"], scale=cfg["scale"], name=name)
        copies.append((name, layer, None))
    elif cls == "Activation":
        layer = layers.Activation(_activation(cfg), name=name)
    elif cls == "ReLU":
        layer = layers.ReLU(max_value=cfg.get("max_value"), name=name)
    elif cls in ("MaxPooling2D", "AveragePooling2D"):
        layer = getattr(layers, cls)(pool_size=cfg["pool_size"], strides=cfg["strides"], padding=cfg["padding"],
                                     name=name)
    elif cls == "Add":
        layer = layers.Add(name=name)
    elif cls == "GlobalAveragePooling2D":
        layer = layers.GlobalAveragePooling2D(keepdims=cfg.get("keepdims", False), name=name)
    else:  # Dense
        layer = layers.Dense(cfg["units"], activation=_activation(cfg), use_bias=cfg["use_bias"], name=name)
        copies.append((name, layer, None))
    return layer(x)

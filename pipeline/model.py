"""Xception (Chollet, arXiv 1610.02357) as one readable builder.

Every layer is named ``block<N>_<role>`` so that per-layer reports, float
fallback lists and weight transfers can address layers by name, stably from
run to run. Keras's own builder leaves the residual convolutions and the Add
layers unnamed (``conv2d_17``); that is the one thing this file does
differently, apart from ``width``/``middle_blocks``/``input_size`` for
edge-sized models.

Block numbering follows the paper and Keras: entry flow blocks 1-4, middle
flow blocks 5..4+M, exit flow blocks 5+M and 6+M (13 and 14 at the default
M=8), so ImageNet weights saved from ``keras.applications.Xception`` map onto
this model layer for layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

MIN_INPUT_SIZE = 71  # the two stride-2 stems and four stride-2 poolings need at least this


@dataclass(frozen=True)
class XceptionConfig:
    input_size: int = 299
    classes: int = 1000
    width: float = 1.0
    middle_blocks: int = 8

    def __post_init__(self):
        if not isinstance(self.input_size, int) or self.input_size < MIN_INPUT_SIZE:
            raise ValueError(f"input_size must be an integer >= {MIN_INPUT_SIZE}, got {self.input_size!r}")
        if not isinstance(self.classes, int) or self.classes < 2:
            raise ValueError(f"classes must be an integer >= 2, got {self.classes!r}")
        if not (0.0 < float(self.width) <= 4.0):
            raise ValueError(f"width must be in (0, 4], got {self.width!r}")
        if not isinstance(self.middle_blocks, int) or self.middle_blocks < 0:
            raise ValueError(f"middle_blocks must be an integer >= 0, got {self.middle_blocks!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def scaled_channels(channels: int, width: float) -> int:
    """Channel count scaled by ``width``, kept a multiple of 8.

    Multiples of 8 keep XNNPACK's int8 and fp32 micro-kernels on their fast
    paths; at width 1.0 every Xception channel count (32..2048, 728 = 91*8) is
    already one, so the default model is exactly the paper's.
    """
    if width == 1.0:
        return channels
    value = max(8, int(channels * width + 4) // 8 * 8)
    if value < 0.9 * channels * width:  # never round down by more than 10%
        value += 8
    return value


def build_xception(input_size: int = 299, classes: int = 1000, width: float = 1.0,
                   middle_blocks: int = 8, *, name: str | None = None):
    """Return an uncompiled Keras 3 Xception with softmax outputs.

    At the defaults this has exactly 22,910,480 parameters, layer for layer the
    same as ``keras.applications.Xception(weights=None)``.
    """
    import keras
    from keras import layers

    cfg = XceptionConfig(input_size=input_size, classes=classes, width=float(width),
                         middle_blocks=middle_blocks)
    c = lambda n: scaled_channels(n, cfg.width)  # noqa: E731

    def bn(x, layer_name):
        return layers.BatchNormalization(name=layer_name)(x)

    def relu(x, layer_name):
        return layers.Activation("relu", name=layer_name)(x)

    def sepconv(x, filters, prefix):
        # No nonlinearity between depthwise and pointwise: the paper found it hurts.
        x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=prefix)(x)
        return bn(x, f"{prefix}_bn")

    def downsampling_block(x, block, filters1, filters2, *, pre_activation=True):
        """Two separable convs and a stride-2 max pool, with a strided 1x1 conv shortcut."""
        p = f"block{block}"
        residual = layers.Conv2D(filters2, 1, strides=2, padding="same", use_bias=False,
                                 name=f"{p}_residual_conv")(x)
        residual = bn(residual, f"{p}_residual_bn")
        if pre_activation:
            x = relu(x, f"{p}_sepconv1_act")
        x = sepconv(x, filters1, f"{p}_sepconv1")
        x = relu(x, f"{p}_sepconv2_act")
        x = sepconv(x, filters2, f"{p}_sepconv2")
        x = layers.MaxPooling2D(3, strides=2, padding="same", name=f"{p}_pool")(x)
        return layers.Add(name=f"{p}_add")([x, residual])

    def middle_block(x, block):
        """Three ReLU-SeparableConv-BN units with an identity shortcut."""
        p = f"block{block}"
        residual = x
        for unit in (1, 2, 3):
            x = relu(x, f"{p}_sepconv{unit}_act")
            x = sepconv(x, c(728), f"{p}_sepconv{unit}")
        return layers.Add(name=f"{p}_add")([x, residual])

    inputs = keras.Input(shape=(cfg.input_size, cfg.input_size, 3), name="image")

    # Entry flow.
    x = layers.Conv2D(c(32), 3, strides=2, use_bias=False, name="block1_conv1")(inputs)
    x = relu(bn(x, "block1_conv1_bn"), "block1_conv1_act")
    x = layers.Conv2D(c(64), 3, use_bias=False, name="block1_conv2")(x)
    x = relu(bn(x, "block1_conv2_bn"), "block1_conv2_act")
    x = downsampling_block(x, 2, c(128), c(128), pre_activation=False)
    x = downsampling_block(x, 3, c(256), c(256))
    x = downsampling_block(x, 4, c(728), c(728))

    # Middle flow.
    for i in range(cfg.middle_blocks):
        x = middle_block(x, 5 + i)

    # Exit flow.
    exit1, exit2 = 5 + cfg.middle_blocks, 6 + cfg.middle_blocks
    x = downsampling_block(x, exit1, c(728), c(1024))
    x = sepconv(x, c(1536), f"block{exit2}_sepconv1")
    x = relu(x, f"block{exit2}_sepconv1_act")
    x = sepconv(x, c(2048), f"block{exit2}_sepconv2")
    x = relu(x, f"block{exit2}_sepconv2_act")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = layers.Dense(cfg.classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=name or "xception")



# ---------------------------------------------------------------- input scaling folded into the stem

PIXEL_SCALE = 127.5  # the training input is p / 127.5 - 1 (pipeline.preprocessing.scale)


def _inbound(layer: dict) -> list[str]:
    """Names of the layers feeding ``layer`` in a functional config (Keras 3 ``keras_history`` or tf_keras lists)."""
    found: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            history = (node.get("config") or {}).get("keras_history") if isinstance(node.get("config"), dict) else None
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


def fold_plan(config: dict) -> tuple[str, str | None] | str:
    """Where the [-1, 1] scaling can be folded, read from a Keras model config.

    Returns ``(conv, bn)`` (the first convolution and the BatchNormalization
    whose moving mean takes the offset, or None when the convolution's own bias
    does) or, when it cannot be folded exactly, the reason as a string.
    """
    by_name, consumers, inputs = _consumers(config)
    if len(inputs) != 1:
        return f"the model has {len(inputs)} input layers"
    first = consumers.get(inputs[0], [])
    if len(first) != 1:
        return f"the input feeds {len(first)} layers, not one convolution"
    conv = by_name[first[0]]
    cfg = conv.get("config") or {}
    if conv.get("class_name") != "Conv2D":
        return f"the first layer ({first[0]}) is a {conv.get('class_name')}, not a Conv2D"
    if cfg.get("data_format") not in (None, "channels_last"):
        return f"the first convolution ({first[0]}) is channels_first"
    if cfg.get("padding") != "valid":
        return (f"the first convolution ({first[0]}) has {cfg.get('padding')!r} padding: its zero pad in [-1, 1] "
                "is pixel 127.5, which no uint8 pixel is, so the fold would not be exact")
    if cfg.get("use_bias"):
        return first[0], None
    if cfg.get("activation") not in (None, "linear"):
        return f"the first convolution ({first[0]}) has no bias and a {cfg.get('activation')} activation"
    after = consumers.get(first[0], [])
    if len(after) != 1 or by_name[after[0]].get("class_name") != "BatchNormalization":
        return f"the first convolution ({first[0]}) has no bias and no single BatchNormalization after it"
    axis = (by_name[after[0]].get("config") or {}).get("axis")
    if axis not in (-1, 3, [-1], [3]):
        return f"the BatchNormalization after {first[0]} normalizes axis {axis}, not the channels"
    return first[0], after[0]


def fold_input_scaling(model):
    """A copy of ``model`` that takes pixels p in [0, 255] where ``model`` takes p / 127.5 - 1.

    For a valid-padding convolution, conv(p / 127.5 - 1; w) = conv(p; w / 127.5)
    - sum(w) per output channel, so the kernel is divided by 127.5 and sum(w)
    is subtracted from the bias, or added to the moving mean of the
    BatchNormalization after it (Xception's stem: no bias, BatchNorm). Exact up
    to float rounding; ``fold_plan`` says why a model cannot be folded.
    """
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
    else:
        conv.set_weights(weights)
        bn = folded.get_layer(bn_name)
        mean = np.asarray(bn.moving_mean.numpy() if hasattr(bn.moving_mean, "numpy") else bn.moving_mean,
                          dtype=np.float64)
        bn.moving_mean.assign((mean + offset).astype(np.float32))
    return folded

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


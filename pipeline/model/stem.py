"""The stem of a user's model, and the model with its input scaling folded into the stem: it takes pixels.

The stem is what the input passes through before anything non-linear: the
model's own normalization layers (``Rescaling``, ``Normalization``: the
model takes pixels and maps them to a * p + b per channel, as MobileNetV3
and EfficientNet do), or else the [-1, 1] scaling this project trains with
(a = 1/127.5, b = -1, applied outside the model); then an optional
``ZeroPadding2D`` and the first ``Conv2D`` (with its bias, or the
BatchNormalization after it). Folding a and b into that convolution,
conv(a p + b; w) = conv(p; w a) + sum(w b), gives a model that takes the
pixels themselves: an 8-bit input of scale 1, each of the 256 values its
own level, with no rescaling op left whose output would be rounded again.

Padding: the stem pads with 0 in normalized space, which is pixel
p0 = -b / a. Where p0 is a whole pixel value (Rescaling(1/255): pixel 0)
the folded model pads with it and is exact. Where it is not ([-1, 1]:
127.5) the folded model pads with a whole pixel value instead (``StemPad``):
exact inside the image, off by |c - p0| pixel on the ring of input pixels
the padding adds, which only the border outputs of the first convolution
see; ``corrected`` also adds the constant border error back after the
convolution, exact in real arithmetic at the cost of one more ADD op.
``pipeline.conversion.convention_choice`` picks one and records it with its
measured effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from pipeline.core.preprocessing import model_input
from pipeline.model.flatten import is_model, keras_of, rebuild
from pipeline.model.keras_output import keras_probabilities

PIXEL_SCALE = 127.5  # the training input is p / 127.5 - 1 (pipeline.core.preprocessing.scale)
# The largest magnitude normalization layers that take pixels produce from 0..255: ImageNet mean/std gives about
# 2.6; a layer expecting [-1, 1] or 0..1 input produces hundreds or more from pixels.
NORMALIZED_BOUND = 16.0


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


def layer_graph(config: dict) -> tuple[dict[str, dict], dict[str, list[str]], list[str]]:
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


NORMALIZING = ("Rescaling", "Normalization")


class StemPad(StrEnum):
    """The whole pixel value that pads a stem whose zero pad is not one (module docstring)."""

    NEAREST = "nearest"  # the nearest pixel value, ties up: 127.5 -> 128
    NEAREST_DOWN = "nearest-down"  # ties down: 127.5 -> 127
    CORRECTED = "corrected"  # nearest, plus the border error added back after the convolution

    def pixel(self, p0: float) -> int:
        value = math.ceil(p0 - 0.5) if self is StemPad.NEAREST_DOWN else math.floor(p0 + 0.5)
        return int(min(255, max(0, value)))


@dataclass(frozen=True)
class Stem:
    """Where a model's input scaling folds: the layers, the affine map per channel and the padding."""

    domain: str  # what the model itself takes: "pixels" (normalization layers inside) or "signed_unit"
    normalizing: tuple[str, ...]  # the model's own Rescaling/Normalization layers, folded away
    pad_layer: str | None  # a ZeroPadding2D before the convolution
    conv: str
    bn: str | None  # the BatchNormalization whose moving mean takes the offset (no conv bias)
    scale: tuple[float, ...]  # a per input channel: the stem computes a * p + b
    offset: tuple[float, ...]  # b
    pads: tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right)) input pixels of padding

    @property
    def padded(self) -> bool:
        return any(any(side) for side in self.pads)

    @property
    def zero_pixel(self) -> tuple[float, ...]:
        """The pixel value p0 = -b / a that the stem's zero padding stands for, per channel."""
        return tuple(-b / a + 0.0 for a, b in zip(self.scale, self.offset))  # + 0.0: no -0.0

    @property
    def exact(self) -> bool:
        """True when the folded model pads with exactly the stem's zero (or does not pad)."""
        return not self.padded or all(p == round(p) and 0 <= p <= 255 for p in self.zero_pixel)

    def pad_pixels(self, pad: StemPad) -> tuple[int, ...]:
        return tuple(int(round(p)) if self.exact else pad.pixel(p) for p in self.zero_pixel)

    def describe(self, pad: StemPad) -> dict:
        """The manifest's account of the fold (the measured effect is added by the caller)."""
        record = {"domain": self.domain, "folded_layers": [*self.normalizing, self.conv],
                  "scale": list(self.scale), "offset": list(self.offset), "exact": self.exact}
        if self.padded:
            record.update({"padding": [list(side) for side in self.pads], "zero_pad_pixel": list(self.zero_pixel),
                           "pad_pixel": list(self.pad_pixels(pad))})
            if not self.exact:
                record.update({"pad": str(pad), "border_correction": pad is StemPad.CORRECTED})
        return record


def _values(x, channels: int) -> np.ndarray | None:
    """A scalar or per-channel parameter as float64 (channels,)."""
    array = np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float64).reshape(-1)
    return np.broadcast_to(array, (channels,)).copy() if array.size in (1, channels) else None


def _normalizing(layer, scale: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray] | str:
    """The affine map after ``layer``, given the map before it, or why it is not a per-channel affine map."""
    channels = scale.size
    name = type(layer).__name__
    if name == "Rescaling":
        a, b = _values(layer.scale, channels), _values(layer.offset, channels)
    else:
        axis = tuple(layer.axis) if isinstance(layer.axis, (list, tuple)) else (layer.axis,)
        if getattr(layer, "invert", False) or axis not in ((-1,), (3,)):
            return f"the Normalization layer {layer.name} inverts or normalizes axis {axis}, not the channels"
        mean, variance = _values(layer.mean, channels), _values(layer.variance, channels)
        if mean is None or variance is None:
            return f"the Normalization layer {layer.name} has {np.size(layer.mean)} means for {channels} channels"
        import keras

        a = 1.0 / np.maximum(np.sqrt(variance), keras.backend.epsilon())
        b = -mean * a
    if a is None or b is None:
        return f"the Rescaling layer {layer.name} does not scale per channel"
    return scale * a, offset * a + b


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding of one axis: the extra pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def find_stem(model) -> Stem | str:
    """The stem of a (flat) Keras 3 or tf_keras model, or why its input scaling cannot be folded."""
    config = model.get_config()
    by_name, consumers, inputs = layer_graph(config)
    if len(inputs) != 1:
        return f"the model has {len(inputs)} input layers"
    channels = int(model.inputs[0].shape[-1])
    scale, offset = np.ones(channels), np.zeros(channels)
    current, normalizing, pad_layer, pads = inputs[0], [], None, ((0, 0), (0, 0))
    size = (int(model.inputs[0].shape[1]), int(model.inputs[0].shape[2]))
    operations = {op.name: op for op in getattr(model, "operations", None) or model.layers}  # ops too (x / 255)
    while True:
        after = consumers.get(current, [])
        if len(after) != 1:
            return f"{'the input' if current == inputs[0] else current} feeds {len(after)} layers, not one convolution"
        current = after[0]
        layer = operations.get(current)
        kind = type(layer).__name__
        if layer is None:
            return f"the first layer ({current}) is not in the model's layers"
        if is_model(layer):
            return f"the first layer ({current}) is a nested model, converted as it is"
        if kind in NORMALIZING and pad_layer is None:
            mapped = _normalizing(layer, scale, offset)
            if isinstance(mapped, str):
                return mapped
            scale, offset = mapped
            normalizing.append(current)
        elif kind == "ZeroPadding2D" and pad_layer is None and layer.data_format == "channels_last":
            (top, bottom), (left, right) = layer.padding
            pad_layer, pads = current, ((int(top), int(bottom)), (int(left), int(right)))
        elif kind == "Conv2D":
            break
        else:
            return f"the first layer ({current}) is a {kind}, not a Conv2D"
    return _with_conv(model, layer, by_name, consumers, _Found(tuple(normalizing), pad_layer, pads, size,
                                                               scale, offset))


@dataclass(frozen=True)
class _Found:
    normalizing: tuple[str, ...]
    pad_layer: str | None
    pads: tuple
    size: tuple[int, int]
    scale: np.ndarray
    offset: np.ndarray


def _with_conv(model, conv, by_name: dict, consumers: dict, found: _Found) -> Stem | str:
    """The stem ending at ``conv``, or why the scaling cannot be folded into it."""
    cfg = conv.get_config()
    if cfg.get("data_format") not in (None, "channels_last") or cfg.get("groups", 1) != 1:
        return f"the first convolution ({conv.name}) is channels_first or grouped"
    pads = found.pads
    if cfg.get("padding") == "same":
        if found.pad_layer is not None or tuple(cfg.get("dilation_rate", (1, 1))) != (1, 1):
            return f"the first convolution ({conv.name}) pads 'same' after padding or dilates"
        kernel, strides = cfg["kernel_size"], cfg["strides"]
        pads = tuple(_same_pads(found.size[i], int(kernel[i]), int(strides[i])) for i in range(2))
    elif cfg.get("padding") != "valid":
        return f"the first convolution ({conv.name}) has {cfg.get('padding')!r} padding"
    bn = None
    if not cfg.get("use_bias"):
        if cfg.get("activation") not in (None, "linear"):
            return f"the first convolution ({conv.name}) has no bias and a {cfg.get('activation')} activation"
        after = consumers.get(conv.name, [])
        if len(after) != 1 or by_name[after[0]].get("class_name") != "BatchNormalization":
            return f"the first convolution ({conv.name}) has no bias and no single BatchNormalization after it"
        axis = (by_name[after[0]].get("config") or {}).get("axis")
        if axis not in (-1, 3, [-1], [3]):
            return f"the BatchNormalization after {conv.name} normalizes axis {axis}, not the channels"
        bn = after[0]
    domain = "pixels" if found.normalizing and takes_pixels(found.scale, found.offset) else "signed_unit"
    scale, offset = found.scale, found.offset
    if domain == "signed_unit":  # the [-1, 1] scaling p / 127.5 - 1 in front of what the model does itself
        scale, offset = scale / PIXEL_SCALE, offset - scale
    if not np.all(scale != 0):
        return f"the input scaling before {conv.name} multiplies a channel by 0"
    return Stem(domain, found.normalizing, found.pad_layer, conv.name, bn, tuple(float(v) for v in scale),
                tuple(float(v) for v in offset), pads)


def takes_pixels(scale: np.ndarray, offset: np.ndarray) -> bool:
    """Whether normalization layers computing ``scale * x + offset`` expect pixels: they send 0..255 into values a
    network is trained on (at most ``NORMALIZED_BOUND``). Keras' applications' ``Rescaling(1 / 255)``,
    ``Rescaling(1 / 127.5, offset=-1)`` and ImageNet mean/std ``Normalization`` do; a ``Rescaling(127.5,
    offset=127.5)`` (a [-1, 1] input turned back into pixels for a network trained on 0..255) sends them to
    32,640 and expects normalized input."""
    ends = np.abs(np.stack([np.asarray(offset, dtype=np.float64), 255.0 * np.asarray(scale) + offset]))
    return bool(np.all(ends <= NORMALIZED_BOUND))


def input_domain(model) -> str:
    """What a Keras model takes: "pixels" when it starts with its own normalization layers that expect pixels
    (``takes_pixels``), else [-1, 1]."""
    if model is None:
        return "signed_unit"
    try:
        config = model.get_config()
    except NotImplementedError:
        return "signed_unit"
    by_name, consumers, inputs = layer_graph(config)
    if len(inputs) != 1 or len(consumers.get(inputs[0], [])) != 1:
        return "signed_unit"
    first = by_name.get(consumers[inputs[0]][0]) or {}
    if first.get("class_name") not in NORMALIZING:
        return "signed_unit"
    mapped = _leading_normalization(model, consumers, inputs[0])
    # A normalization whose values cannot be read is taken to expect pixels, as Keras' applications' do.
    return "pixels" if isinstance(mapped, str) or takes_pixels(*mapped) else "signed_unit"


def _leading_normalization(model, consumers: dict, first: str) -> tuple[np.ndarray, np.ndarray] | str:
    """The affine map of the normalization layers the input goes through first (the same map ``find_stem``
    folds), whatever follows them; or why it cannot be read."""
    channels = int(model.inputs[0].shape[-1])
    scale, offset = np.ones(channels), np.zeros(channels)
    operations = {op.name: op for op in getattr(model, "operations", None) or model.layers}
    current = first
    while len(consumers.get(current, [])) == 1:
        layer = operations.get(consumers[current][0])
        if layer is None or type(layer).__name__ not in NORMALIZING:
            break
        mapped = _normalizing(layer, scale, offset)
        if isinstance(mapped, str):
            return mapped
        (scale, offset), current = mapped, layer.name
    return scale, offset


def _stem_layers(keras) -> tuple[type, type]:
    """The two layers a folded stem may need, in the Keras that built the model (Keras 3's ops or, for tf_keras,
    TensorFlow's), defined on first use (Keras is imported lazily)."""
    if keras.__name__ not in _LAYERS:
        import tensorflow as tf

        ops = keras.ops if hasattr(keras, "ops") else None
        pad = ops.pad if ops is not None else tf.pad
        concatenate = ops.concatenate if ops is not None else tf.concat
        constant = ops.convert_to_tensor if ops is not None else tf.convert_to_tensor

        class PixelPad(keras.layers.Layer):
            """Pads an image with a given pixel value per channel (one PADV2 when all channels share it, else one
            per channel and a CONCATENATION)."""

            def __init__(self, pads, values, **kwargs):
                super().__init__(**kwargs)
                self.pads, self.values = [[0, 0], *map(list, pads), [0, 0]], [float(v) for v in values]

            def get_config(self):
                return {**super().get_config(), "pads": self.pads[1:3], "values": self.values}

            def call(self, x):
                if len(set(self.values)) == 1:
                    return pad(x, self.pads, constant_values=self.values[0])
                # Each channel's pad pads the whole input and is sliced after: the PADV2s, which XNNPACK leaves
                # to the builtin kernels, then all read the input, so they run before the delegate's one
                # partition instead of splitting it (slices before them would be delegated).
                return concatenate([pad(x, self.pads, constant_values=v)[..., k:k + 1]
                                    for k, v in enumerate(self.values)], axis=-1)

        class AddConstant(keras.layers.Layer):
            """Adds a fixed tensor (the stem's border correction)."""

            def __init__(self, value, **kwargs):
                super().__init__(**kwargs)
                self.value = np.asarray(value, dtype=np.float32)

            def get_config(self):
                return {**super().get_config(), "value": self.value.tolist()}

            def call(self, x):
                return x + constant(self.value)

        _LAYERS[keras.__name__] = (PixelPad, AddConstant)
    return _LAYERS[keras.__name__]


_LAYERS: dict[str, tuple[type, type]] = {}  # by the Keras module's name: keras or tf_keras


def border_error(stem: Stem, kernel: np.ndarray, size: tuple[int, int], values, strides) -> np.ndarray:
    """What padding with ``values`` instead of the stem's zero pixel adds to the folded convolution's output
    (H', W', C_out): the convolution, without bias, of the difference on the padding ring (0 inside)."""
    (top, bottom), (left, right) = stem.pads
    height, width = size
    ring = np.zeros((height + top + bottom, width + left + right, kernel.shape[2]))
    ring[:] = np.asarray(values, dtype=np.float64) - np.asarray(stem.zero_pixel)
    ring[top:top + height, left:left + width] = 0.0
    windows = np.lib.stride_tricks.sliding_window_view(ring, kernel.shape[:2], axis=(0, 1))  # (H', W', C, kh, kw)
    return np.einsum("ijcuv,uvco->ijo", windows[::strides[0], ::strides[1]], kernel)


def fold_stem(model, stem: Stem, pad: StemPad = StemPad.NEAREST):
    """A model that takes pixels p in [0, 255] where ``model`` takes its own input (module docstring): new
    layers throughout (``model`` is not changed, and no layer belongs to both). A tf_keras model is folded
    with tf_keras layers."""
    keras = keras_of(model)
    conv = model.get_layer(stem.conv)
    weights = [np.asarray(w, dtype=np.float64) for w in conv.get_weights()]
    shift = np.einsum("hwio,i->o", weights[0], np.asarray(stem.offset))  # sum(w b) per output channel
    weights[0] = weights[0] * np.asarray(stem.scale)[None, None, :, None]
    if stem.bn is None:
        weights[1] = weights[1] + shift
    values = stem.pad_pixels(pad)
    correction = None
    if stem.padded and not stem.exact and pad is StemPad.CORRECTED:
        size = (int(model.inputs[0].shape[1]), int(model.inputs[0].shape[2]))
        strides = tuple(conv.get_config()["strides"])
        correction = -border_error(stem, weights[0], size, values, strides)[None].astype(np.float32)
    pixel_pad, add_constant = _stem_layers(keras)

    def padded(layer, xs):
        return pixel_pad(stem.pads, values, name=f"{stem.conv}_pixel_pad")(xs[0])

    def convolved(layer, xs):
        x = padded(layer, xs) if stem.padded and stem.pad_layer is None else xs[0]
        new = type(conv).from_config({**conv.get_config(), "padding": "valid"})
        y = new(x)
        new.set_weights([w.astype(np.float32) for w in weights])
        return y if correction is None else add_constant(correction, name=f"{stem.conv}_border")(y)

    def normalized(layer, xs):  # the BatchNormalization after a bias-free stem takes the offset in its mean
        new = type(layer).from_config(layer.get_config())
        y = new(xs[0])
        gamma, beta, mean, variance = layer.get_weights()
        new.set_weights([gamma, beta, (np.asarray(mean, dtype=np.float64) - shift).astype(np.float32), variance])
        return y

    substitute = {name: (lambda layer, xs: xs[0]) for name in stem.normalizing}
    substitute[stem.conv] = convolved
    if stem.pad_layer is not None:
        substitute[stem.pad_layer] = padded
    if stem.bn is not None:
        substitute[stem.bn] = normalized
    rebuilt = rebuild(model, substitute)
    folded = keras.models.clone_model(rebuilt)
    folded.set_weights(rebuilt.get_weights())
    return folded


def fold_effect(original, folded, domain: str, pixels: np.ndarray) -> dict:
    """How far the folded model is from the original on decoded ``pixels`` (N, H, W, 3 uint8), in float:
    top-1 agreement, mean KL(original || folded) and the largest probability difference."""
    def run(model, convention):  # in batches of 8: a 299 px network holds ~300 MB of activations per image
        return np.concatenate([np.asarray(model(model_input(pixels[i:i + 8], convention), training=False))
                               for i in range(0, len(pixels), 8)])

    ref = keras_probabilities(original, run(original, domain))
    new = keras_probabilities(original, run(folded, "pixels"))
    eps = 1e-12
    kl = np.sum(ref * (np.log(ref + eps) - np.log(new + eps)), axis=1)
    return {"images": int(len(pixels)), "top1_agreement": float(np.mean(ref.argmax(1) == new.argmax(1))),
            "mean_kl": float(np.mean(kl)), "max_abs_probability_difference": float(np.max(np.abs(ref - new)))}

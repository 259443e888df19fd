"""Fold a per-channel multiplier that follows a ReLU into the weights of the layer before it.

Why: a Keras model with BatchNormalization *after* the activation
(``Conv2D(activation="relu") -> BatchNormalization``) converts to
``CONV_2D(RELU) -> MUL(c) -> ADD(d)``: the converter folds a BatchNorm into
the conv only when it comes before the ReLU. In int8 the MUL's constant is
quantized with one scale for all channels, so a channel whose multiplier is
far below the largest lands on 0 or a few levels and its signal is lost; and
the conv's output, read before the multiplier, is quantized per tensor over
channels whose ranges differ as much as the multipliers do. Measured on a
pretrained CIFAR-10 CNN of that shape: 44 of 64 multipliers of one layer
within 4 int8 levels of 0, and 66% top-1 agreement of int8 with float.

For ``a >= 0``, ``a * ReLU(z) = ReLU(a * z)``, so a multiplier's magnitude
moves into the producer's weights and bias of that output channel (where
int8 keeps one scale per output channel), exactly in float; only its sign
(1, -1, or 0 where the multiplier is 0) stays in the MUL, and a MUL left
multiplying by 1 everywhere is removed. With no fused activation the whole
multiplier, sign included, folds. RELU6 and RELU_N1_TO_1 clip at a fixed
value, which scaling does not commute with: they are left alone, as is any
producer whose output something else reads, whose constants another tensor
shares, or that has no bias.

The ADD that follows a removed MUL (the BatchNorm's offset ``d``) is then
folded into the bias of the layer that reads it, where that is exact: a
VALID conv or a dense layer of ``y + d`` is one of ``y`` plus a constant per
output channel, and a max pool or a flattening reshape on the way passes the
shift through (``max(y + d) = max(y) + d`` per channel). A SAME conv pads
with zeros that the offset would not shift, so that ADD stays. Without it,
int8 requantizes every block's output once more, shifted by ``d``: on the
CIFAR-10 CNN, int8 agreement went from 92.5% with the multipliers folded to
97.2% with the offsets folded too (docs/validation.md).

A folded producer's output tensor is renamed (its name, then the MUL's):
it no longer holds what the unfolded model's tensor of that name holds, and
tools that pair a quantized model's tensors with a float model's by name
(per-layer error, bias correction) must not pair it with the unfolded one.
The producer's own name comes first, so it still reads as its layer
(``pipeline.tflite.layers.primary_layer``). So are the outputs of a pool or
reshape that an offset no longer shifts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.tflite import flatbuffers
from pipeline.tflite.flatbuffers import ints, text
from pipeline.tflite.layers import layer_names, primary_layer

# Output channel axis of the weights of each producer the fold takes.
_CHANNEL_AXIS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": -1, "FULLY_CONNECTED": 0}
_RELU, _NONE = "RELU", "NONE"


@dataclass(frozen=True)
class FoldedLayer:
    """One producer whose output channels took the following MUL's magnitudes."""

    layer: str  # the producer's layer (its conv/matmul part of the fused tensor name)
    op: str
    channels: int
    negative: int  # multipliers below 0: the MUL keeps -1 there (a RELU producer)
    zero: int  # multipliers equal to 0: the MUL keeps 0 there, the weights of that channel are left as they were
    mul_removed: bool
    output: str = ""  # the producer's output tensor, renamed

    def to_dict(self) -> dict:
        return {"layer": self.layer, "op": self.op, "channels": self.channels, "negative": self.negative,
                "zero": self.zero, "mul_removed": self.mul_removed}


@dataclass(frozen=True)
class FoldedOffset:
    """One per-channel ADD removed: its constant went into the bias of the layer that reads it."""

    layer: str  # the ADD's layer (a BatchNormalization's offset)
    into: str  # the layer whose bias took it
    op: str  # that layer's op
    through_pool: bool  # a MAX_POOL_2D sat between them

    def to_dict(self) -> dict:
        return {"layer": self.layer, "into": self.into, "op": self.op, "through_pool": self.through_pool}


@dataclass(frozen=True)
class FoldReport:
    """What ``fold_scales`` changed: one entry per folded producer and per folded ADD, in graph order."""

    layers: tuple[FoldedLayer, ...] = field(default_factory=tuple)
    offsets: tuple[FoldedOffset, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"folded": len(self.layers), "muls_removed": sum(entry.mul_removed for entry in self.layers),
                "adds_removed": len(self.offsets), "layers": [entry.to_dict() for entry in self.layers],
                "offsets": [entry.to_dict() for entry in self.offsets]}




@dataclass
class _Graph:
    """One subgraph's wiring: who writes and who reads each tensor, and how many tensors use each buffer."""

    model: Any  # the flatbuffer object API's ModelT (untyped generated code)
    graph: Any
    producer: dict[int, int]
    readers: dict[int, list[int]]
    buffer_users: dict[int, int]
    outputs: set[int]

    @classmethod
    def of(cls, model) -> _Graph:
        graph = model.subgraphs[0]
        producer: dict[int, int] = {}
        readers: dict[int, list[int]] = {}
        for index, op in enumerate(graph.operators or []):
            for t in ints(op.outputs):
                producer[t] = index
            for t in ints(op.inputs):
                if t >= 0:
                    readers.setdefault(t, []).append(index)
        users: dict[int, int] = {}
        for tensor in graph.tensors:
            users[int(tensor.buffer)] = users.get(int(tensor.buffer), 0) + 1
        return cls(model, graph, producer, readers, users, set(ints(graph.outputs)))

    def constant(self, t: int) -> np.ndarray | None:
        """A float32 constant's values (shaped), or None: not a constant, or not float32."""
        tensor = self.graph.tensors[t]
        data = self.model.buffers[int(tensor.buffer)].data
        if data is None or len(data) == 0 or flatbuffers.type_names()[tensor.type] != "FLOAT32":
            return None
        shape = [int(s) for s in tensor.shape] if tensor.shape is not None else []
        return np.frombuffer(np.asarray(data, dtype=np.uint8).tobytes(), dtype=np.float32).reshape(shape)

    def values(self, t: int) -> np.ndarray:
        """A float32 constant's values, for a tensor already matched as one."""
        found = self.constant(t)
        if found is None:
            raise ValueError(f"tensor {t} is not a float32 constant")
        return found

    def own_constant(self, t: int) -> np.ndarray | None:
        """A float32 constant only one op reads and no other tensor shares the buffer of, so it may be rewritten."""
        if len(self.readers.get(t, [])) != 1 or self.buffer_users.get(int(self.graph.tensors[t].buffer), 0) != 1:
            return None
        return self.constant(t)

    def activation(self, op) -> str:
        code = getattr(op.builtinOptions, "fusedActivationFunction", None)
        names = {v: k for k, v in vars(flatbuffers.schema().ActivationFunctionType).items() if not k.startswith("_")}
        return names.get(code, "?") if code is not None else _NONE


@dataclass(frozen=True)
class _Match:
    """A ``P -> MUL(c)`` pair the fold may rewrite."""

    mul: int
    producer: int
    kind: str
    factors: np.ndarray  # c, one per output channel (a scalar broadcast)
    const_input: int  # which of the MUL's inputs is c


def _per_channel(c: np.ndarray, channels: int) -> np.ndarray | None:
    """``c`` as one factor per channel of the last axis, or None when it varies along another axis."""
    if c.size == 1:
        return np.full(channels, float(c.reshape(-1)[0]), dtype=np.float64)
    if c.ndim >= 1 and c.shape[-1] == channels and c.size == channels:
        return c.reshape(-1).astype(np.float64)
    return None


def _constant_operands(g: _Graph, op, kind: str):
    """(constant values, the other input, which input is the constant) for each way ``op``, a ``kind`` op with no
    fused activation and two inputs, reads one constant beside one tensor."""
    inputs = ints(op.inputs)
    if flatbuffers.op_name(g.model, op) != kind or len(inputs) != 2 or g.activation(op) != _NONE:
        return
    for const_input in (0, 1):
        c = g.constant(inputs[const_input])
        if c is not None:
            yield c, inputs[1 - const_input], const_input


def _match(g: _Graph, index: int) -> _Match | None:
    op = g.graph.operators[index]
    for c, x, const_input in _constant_operands(g, op, "MUL"):
        if x not in g.producer or x in g.outputs or len(g.readers.get(x, [])) != 1:
            continue
        p = g.graph.operators[g.producer[x]]
        kind = flatbuffers.op_name(g.model, p)
        p_inputs = ints(p.inputs)
        out_shape = [int(s) for s in g.graph.tensors[x].shape]
        if (kind not in _CHANNEL_AXIS or g.activation(p) not in (_RELU, _NONE) or len(p_inputs) < 3
                or p_inputs[2] < 0 or len(ints(p.outputs)) != 1 or not out_shape
                or [int(s) for s in g.graph.tensors[ints(op.outputs)[0]].shape] != out_shape):
            continue
        if g.own_constant(p_inputs[1]) is None or g.own_constant(p_inputs[2]) is None:
            continue
        factors = _per_channel(c, out_shape[-1])
        if factors is not None:
            return _Match(index, g.producer[x], kind, factors, const_input)
    return None


def _split(factors: np.ndarray, activation: str) -> tuple[np.ndarray, np.ndarray]:
    """(what moves into the producer, what stays in the MUL), per channel: their product is the factor."""
    if activation == _NONE:
        return factors, np.ones_like(factors)
    moved = np.where(factors == 0, 1.0, np.abs(factors))
    return moved, np.sign(factors)


def _scale(g: _Graph, t: int, moved: np.ndarray, axis: int) -> None:
    values = g.values(t).astype(np.float64)
    shape = [1] * values.ndim
    shape[axis] = -1
    scaled = (values * moved.reshape(shape)).astype(np.float32)
    g.model.buffers[int(g.graph.tensors[t].buffer)].data = np.frombuffer(scaled.tobytes(), dtype=np.uint8).copy()


def _kept_constant(g: _Graph, m: _Match, kept: np.ndarray) -> None:
    """The MUL reads a new constant of the same shape holding the signs (a new tensor and buffer: never shared)."""
    schema = flatbuffers.schema()
    op = g.graph.operators[m.mul]
    old = g.graph.tensors[int(op.inputs[m.const_input])]
    shape = g.values(int(op.inputs[m.const_input])).shape
    size = int(np.prod(shape, dtype=np.int64))
    values = (kept if size == kept.size else np.full(shape, kept[0])).astype(np.float32).reshape(shape)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(values.tobytes(), dtype=np.uint8).copy()
    g.model.buffers.append(buffer)
    tensor = schema.TensorT()
    tensor.shape, tensor.type, tensor.name = old.shape, old.type, (text(old.name) + "/sign").encode()
    tensor.buffer = len(g.model.buffers) - 1
    g.graph.tensors.append(tensor)
    op.inputs[m.const_input] = len(g.graph.tensors) - 1


def _fold(g: _Graph, m: _Match) -> FoldedLayer:
    """Rewrite one match in place (weights, bias, the MUL's constant or the MUL itself, the output's name)."""
    p, mul = g.graph.operators[m.producer], g.graph.operators[m.mul]
    activation = g.activation(p)
    moved, kept = _split(m.factors, activation)
    p_inputs = ints(p.inputs)
    _scale(g, p_inputs[1], moved, _CHANNEL_AXIS[m.kind])
    _scale(g, p_inputs[2], moved, 0)
    out, mul_out = ints(p.outputs)[0], ints(mul.outputs)[0]
    name, mul_name = text(g.graph.tensors[out].name), text(g.graph.tensors[mul_out].name)
    layer = primary_layer(name, layer_names(name))
    remove = bool(np.all(kept == 1)) and mul_out not in g.outputs
    if remove:
        g.graph.tensors[out].name = f"{name};{mul_name}".encode()
        for reader in g.readers.get(mul_out, []):
            ins = g.graph.operators[reader].inputs
            for i, t in enumerate(ints(ins)):
                if t == mul_out:
                    ins[i] = out
    else:
        g.graph.tensors[out].name = f"{name};{mul_name}/magnitude".encode()
        _kept_constant(g, m, kept)
    return FoldedLayer(layer, m.kind, int(m.factors.size), int(np.sum(m.factors < 0)), int(np.sum(m.factors == 0)),
                       remove, text(g.graph.tensors[out].name))


def fold_scales(model_bytes: bytes) -> tuple[bytes, FoldReport]:
    """The float model with every foldable ``P -> MUL(c)`` folded, then the ``ADD(d)`` after each MUL removed folded
    into the next layer's bias (module docstring); the same bytes when nothing is.

    The rewritten model computes the same function up to float rounding.
    """
    model = flatbuffers.read(model_bytes)
    if len(model.subgraphs) != 1:
        return model_bytes, FoldReport()
    scales = _fold_multipliers(model)
    if not scales:
        return model_bytes, FoldReport()
    _drop_unused_tensors(model)
    offsets = _fold_offsets(model, {entry.output for entry in scales if entry.mul_removed})
    if offsets:
        _drop_unused_tensors(model)
    return flatbuffers.write(model), FoldReport(scales, offsets)


def _fold_multipliers(model) -> tuple[FoldedLayer, ...]:
    g = _Graph.of(model)
    matches, touched = [], set()
    for index in range(len(g.graph.operators or [])):
        m = _match(g, index)
        if m is None or m.producer in touched:
            continue
        moved, _ = _split(m.factors, g.activation(g.graph.operators[m.producer]))
        if np.all(moved == 1) and g.activation(g.graph.operators[m.producer]) == _RELU:
            continue  # nothing to move (every factor is 1, -1 or 0)
        matches.append(m)
        touched.add(m.producer)
    folded = tuple(_fold(g, m) for m in matches)
    removed = {m.mul for m, entry in zip(matches, folded) if entry.mul_removed}
    g.graph.operators = [op for i, op in enumerate(g.graph.operators) if i not in removed]
    return folded


def _drop_unused_tensors(model) -> None:
    """Remove tensors no op, graph input/output or signature names (a removed MUL's), renumbering the rest; the
    buffers only they used are emptied (buffer indices stay)."""
    graph = model.subgraphs[0]
    used: set[int] = set(ints(graph.inputs)) | set(ints(graph.outputs))
    for op in graph.operators:
        used |= {t for t in ints(op.inputs) + ints(op.outputs) + ints(op.intermediates) if t >= 0}
    for signature in model.signatureDefs or []:
        used |= {int(t.tensorIndex) for t in list(signature.inputs or []) + list(signature.outputs or [])}
    keep = [t for t in range(len(graph.tensors)) if t in used]
    renumber = {old: new for new, old in enumerate(keep)}
    dropped = [graph.tensors[t] for t in range(len(graph.tensors)) if t not in used]
    graph.tensors = [graph.tensors[t] for t in keep]
    still = {int(t.buffer) for t in graph.tensors}
    for tensor in dropped:
        if int(tensor.buffer) not in still and int(tensor.buffer) > 0:
            model.buffers[int(tensor.buffer)].data = None

    def remap(values):
        return np.asarray([renumber[t] if t >= 0 else t for t in ints(values)], dtype=np.int32)

    for op in graph.operators:
        op.inputs, op.outputs = remap(op.inputs), remap(op.outputs)
        if op.intermediates is not None:
            op.intermediates = remap(op.intermediates)
    graph.inputs, graph.outputs = remap(graph.inputs), remap(graph.outputs)
    for signature in model.signatureDefs or []:
        for t in list(signature.inputs or []) + list(signature.outputs or []):
            t.tensorIndex = renumber[int(t.tensorIndex)]


@dataclass(frozen=True)
class _OffsetMatch:
    """An ``x -> ADD(d) [-> MAX_POOL_2D] [-> RESHAPE] -> Q`` chain whose ``d`` folds into ``Q``'s bias."""

    add: int
    x: int  # the ADD's other input, which the chain reads instead
    shift: np.ndarray  # what Q's bias gains
    between: tuple[int, ...]  # the pool and reshape ops between the ADD and Q
    reader: int  # Q


def _sole_reader(g: _Graph, t: int) -> int | None:
    readers = g.readers.get(t, [])
    return readers[0] if len(readers) == 1 and t not in g.outputs else None


def _bias_shift(g: _Graph, q, d: np.ndarray) -> np.ndarray | None:
    """What ``Q(x + d) - Q(x)`` is, per output channel, where that is a constant: a VALID conv (a SAME one pads
    with zeros, which are not shifted) or a fully connected layer over channel-last features."""
    kind, inputs = flatbuffers.op_name(g.model, q), ints(q.inputs)
    if kind not in _CHANNEL_AXIS or len(inputs) < 3 or inputs[2] < 0:
        return None
    weights, bias = g.own_constant(inputs[1]), g.own_constant(inputs[2])
    if weights is None or bias is None:
        return None
    w, channels = weights.astype(np.float64), d.size
    if kind != "FULLY_CONNECTED" and q.builtinOptions.padding != flatbuffers.schema().Padding.VALID:
        return None
    if kind == "CONV_2D" and w.shape[-1] == channels:
        return np.einsum("ohwi,i->o", w, d)
    if kind == "DEPTHWISE_CONV_2D" and w.shape[-1] % channels == 0:
        return np.repeat(d, w.shape[-1] // channels) * w.sum(axis=(0, 1, 2))
    features = [int(s) for s in g.graph.tensors[inputs[0]].shape]
    if kind == "FULLY_CONNECTED" and w.shape[1] % channels == 0 and (
            int(np.prod(features[1:])) == w.shape[1] or w.shape[1] == channels == features[-1]):
        return w @ np.tile(d, w.shape[1] // channels)
    return None


def _path_to_reader(g: _Graph, out: int) -> tuple[tuple[int, ...], int] | None:
    """(the MAX_POOL_2D and RESHAPE ops that pass ``out`` on, the weighted op that reads it), each the sole reader
    of the one before; a RESHAPE only in front of a fully connected layer (it keeps the channel-last order)."""
    between: list[int] = []
    reader = _sole_reader(g, out)
    for kind in ("MAX_POOL_2D", "RESHAPE"):
        if reader is not None and flatbuffers.op_name(g.model, g.graph.operators[reader]) == kind:
            op = g.graph.operators[reader]
            if ints(op.inputs)[0] != (ints(g.graph.operators[between[-1]].outputs)[0] if between else out):
                return None
            if kind == "MAX_POOL_2D" and g.activation(op) != _NONE:
                return None
            between.append(reader)
            reader = _sole_reader(g, ints(op.outputs)[0])
    if reader is None:
        return None
    kind = flatbuffers.op_name(g.model, g.graph.operators[reader])
    last = ints(g.graph.operators[between[-1]].outputs)[0] if between else out
    if ints(g.graph.operators[reader].inputs)[0] != last or (
            between and flatbuffers.op_name(g.model, g.graph.operators[between[-1]]) == "RESHAPE"
            and kind != "FULLY_CONNECTED"):
        return None
    return tuple(between), reader


def _offset_match(g: _Graph, index: int, folded: set[str]) -> _OffsetMatch | None:
    op = g.graph.operators[index]
    for d, x, _ in _constant_operands(g, op, "ADD"):
        if text(g.graph.tensors[x].name) not in folded:
            continue
        out = ints(op.outputs)[0]
        shape = [int(s) for s in g.graph.tensors[x].shape]
        factors = _per_channel(d, shape[-1]) if shape else None
        path = _path_to_reader(g, out)
        if factors is None or path is None or [int(s) for s in g.graph.tensors[out].shape] != shape:
            return None
        shift = _bias_shift(g, g.graph.operators[path[1]], factors)
        return None if shift is None else _OffsetMatch(index, x, shift, *path)
    return None


def _fold_offsets(model, folded: set[str]) -> tuple[FoldedOffset, ...]:
    """Each ADD of a per-channel constant after a producer whose MUL was removed, folded into the bias of the layer
    reading it (through a MAX_POOL_2D: max(y + d) = max(y) + d per channel; through a flattening RESHAPE), and
    removed. What runs in int8 is then the producer's non-negative output itself, without a requantized copy
    shifted by d."""
    g = _Graph.of(model)
    found, removed = [], set()
    for index in range(len(g.graph.operators)):
        m = _offset_match(g, index, folded)
        if m is None:
            continue
        q = g.graph.operators[m.reader]
        bias = ints(q.inputs)[2]
        shifted = (g.values(bias).astype(np.float64) + m.shift).astype(np.float32)
        g.model.buffers[int(g.graph.tensors[bias].buffer)].data = np.frombuffer(shifted.tobytes(), np.uint8).copy()
        g.graph.operators[m.between[0] if m.between else m.reader].inputs[0] = m.x
        add_name = text(g.graph.tensors[ints(g.graph.operators[m.add].outputs)[0]].name)
        for passed in m.between:  # no longer shifted: not the unfolded model's tensor of that name
            tensor = g.graph.tensors[ints(g.graph.operators[passed].outputs)[0]]
            tensor.name = f"{text(tensor.name)};{add_name}/unshifted".encode()
        q_name = text(g.graph.tensors[ints(q.outputs)[0]].name)
        if not layer_names(q_name):  # a graph output named "Identity": its weights still name the layer
            q_name = text(g.graph.tensors[ints(q.inputs)[1]].name)
        pooled = any(flatbuffers.op_name(g.model, g.graph.operators[i]) == "MAX_POOL_2D" for i in m.between)
        found.append(FoldedOffset(primary_layer(add_name, layer_names(add_name)),
                                  primary_layer(q_name, layer_names(q_name)), flatbuffers.op_name(g.model, q),
                                  pooled))
        removed.add(m.add)
    g.graph.operators = [op for i, op in enumerate(g.graph.operators) if i not in removed]
    return tuple(found)

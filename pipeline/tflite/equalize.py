"""Cross-layer equalization of a float .tflite: each pair of weighted layers in a row gets balanced channel ranges.

Why: int8 gives a convolution one weight scale per *output* channel, so a
layer whose *input* channels differ widely in magnitude (the 1x1 conv after
a depthwise conv, whose channels come out of unrelated 3x3 filters) spends
most of its 255 levels on the widest channel and rounds the others coarsely.
For a pair ``L1 -> [ReLU] -> L2`` in which ``L2`` alone reads ``L1``'s
output, scaling ``L1``'s output channel ``c`` (weights and bias) by ``1/s_c``
and ``L2``'s input channel ``c`` by ``s_c`` computes the same function for
any ``s_c > 0``, because ``ReLU(z / s) = ReLU(z) / s`` (Nagel et al. 2019,
"Data-Free Quantization Through Weight Equalization and Bias Correction").
With ``r1_c`` the range (largest magnitude) of ``L1``'s output channel ``c``
and ``r2_c`` that of ``L2``'s input channel ``c``, ``s_c = sqrt(r1_c / r2_c)``
leaves both at ``sqrt(r1_c * r2_c)``: the two layers' ranges per channel are
then proportional to each other, which the paper shows maximizes the
product of their per-channel precisions. A layer that is the second of one
pair and the first of the next is balanced by repeated sweeps until the
scales stop changing.

Exact only where the activation between commutes with a positive scale:
none or ReLU (fused into ``L1``, as the converter writes it). RELU6 and
RELU_N1_TO_1 clip at a fixed value and are skipped, as is a pair whose
middle tensor something else also reads (or is a graph output), a grouped
convolution, and a depthwise ``L2`` with a channel multiplier. A weight or
bias tensor that other layers share gets a copy of its own. The rewrite
is in float only; the float model users get and validate against is not
touched.

``L1``'s output tensor is renamed (``;equalized`` appended): it no longer
holds what the unequalized model's tensor of that name holds, so tools that
pair tensors by name (per-layer error, bias correction) do not pair it with
the unequalized one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.tflite import flatbuffers
from pipeline.tflite.flatbuffers import ints, text
from pipeline.tflite.layers import layer_names, primary_layer

_KINDS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_OUT_AXIS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}  # [o,h,w,i], [1,h,w,o], [o,i]
_IN_AXIS = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 1}
_EXACT = ("NONE", "RELU")
_SWEEPS, _CONVERGED = 50, 1e-6  # largest |log s| of a sweep under which the scales have stopped changing
SUFFIX = ";equalized"


@dataclass(frozen=True)
class EqualizedPair:
    """One pair balanced: its layers, and how far apart ``L2``'s input-channel ranges were before and after
    (largest over smallest nonzero range)."""

    first: str
    second: str
    ops: str  # "DEPTHWISE_CONV_2D -> CONV_2D"
    channels: int
    spread_before: float
    spread_after: float

    def to_dict(self) -> dict:
        return {"first": self.first, "second": self.second, "ops": self.ops, "channels": self.channels,
                "spread_before": round(self.spread_before, 3), "spread_after": round(self.spread_after, 3)}


@dataclass(frozen=True)
class EqualizeReport:
    """What ``equalize`` changed: the pairs in graph order, the sweeps it took, and the pairs it left alone for
    their activation (RELU6 and RELU_N1_TO_1 clip; any other but ReLU does not commute with a scale either)."""

    pairs: tuple[EqualizedPair, ...] = field(default_factory=tuple)
    sweeps: int = 0
    skipped_clipping: int = 0

    def to_dict(self) -> dict:
        return {"pairs": len(self.pairs), "sweeps": self.sweeps, "skipped_clipping": self.skipped_clipping,
                "layers": [entry.to_dict() for entry in self.pairs]}


@dataclass
class _Pair:
    first: int  # op indices
    second: int
    scale: np.ndarray  # s_c accumulated over the sweeps




class _Weights:
    """The float32 weights and biases of a subgraph's weighted ops, held in float64 while they are balanced and
    written back once (into a buffer of their own where the old one was shared)."""

    def __init__(self, model):
        self.model, self.graph = model, model.subgraphs[0]
        self.readers: dict[int, list[int]] = {}
        for index, op in enumerate(self.graph.operators or []):
            for t in ints(op.inputs):
                if t >= 0:
                    self.readers.setdefault(t, []).append(index)
        self.values: dict[int, np.ndarray] = {}  # tensor -> values being balanced

    def kind(self, index: int) -> str:
        return flatbuffers.op_name(self.model, self.graph.operators[index])

    def constant(self, t: int) -> np.ndarray | None:
        if t < 0:
            return None
        if t not in self.values:
            tensor = self.graph.tensors[t]
            data = self.model.buffers[int(tensor.buffer)].data
            if data is None or len(data) == 0 or flatbuffers.type_names()[tensor.type] != "FLOAT32":
                return None
            shape = [int(s) for s in tensor.shape] if tensor.shape is not None else []
            raw = np.frombuffer(np.asarray(data, dtype=np.uint8).tobytes(), dtype=np.float32)
            self.values[t] = raw.reshape(shape).astype(np.float64)
        return self.values[t]

    def array(self, t: int) -> np.ndarray:
        """A float32 constant's values, for a tensor already matched as one."""
        found = self.constant(t)
        if found is None:
            raise ValueError(f"tensor {t} is not a float32 constant")
        return found

    def activation(self, index: int) -> str:
        code = getattr(self.graph.operators[index].builtinOptions, "fusedActivationFunction", None)
        names = {v: k for k, v in vars(flatbuffers.schema().ActivationFunctionType).items() if not k.startswith("_")}
        return names.get(code, "?") if code is not None else "NONE"

    def write(self, t: int) -> None:
        """Tensor ``t`` gets its balanced values: in its buffer, or in a new one where other tensors share it."""
        tensor = self.graph.tensors[t]
        data = np.frombuffer(self.values[t].astype(np.float32).tobytes(), dtype=np.uint8).copy()
        if sum(int(other.buffer) == int(tensor.buffer) for other in self.graph.tensors) == 1:
            self.model.buffers[int(tensor.buffer)].data = data
            return
        buffer = flatbuffers.schema().BufferT()
        buffer.data = data
        self.model.buffers.append(buffer)
        tensor.buffer = len(self.model.buffers) - 1

    def privatize(self, index: int) -> None:
        """Op ``index``'s weights and bias as tensors only it reads: the converter gives layers with equal constants
        (the zero biases of depthwise convs) one tensor, which cannot take one layer's scaling for all."""
        schema, op = flatbuffers.schema(), self.graph.operators[index]
        for position, t in enumerate(ints(op.inputs)):
            if position == 0 or t < 0 or len(self.readers.get(t, [])) < 2:
                continue
            old, tensor = self.graph.tensors[t], schema.TensorT()
            tensor.shape, tensor.type, tensor.buffer = old.shape, old.type, old.buffer
            tensor.name, tensor.shapeSignature = old.name, old.shapeSignature
            self.graph.tensors.append(tensor)
            op.inputs[position] = len(self.graph.tensors) - 1
            self.readers[t].remove(index)
            self.readers[len(self.graph.tensors) - 1] = [index]


def _channels(w: _Weights, index: int) -> int | None:
    """``index``'s output channels where it can be the first of a pair (float32 weights), else None."""
    op = w.graph.operators[index]
    inputs = ints(op.inputs)
    if w.kind(index) not in _KINDS or len(inputs) < 2 or len(ints(op.outputs)) != 1:
        return None
    weights = w.constant(inputs[1])
    if weights is None or weights.ndim != (2 if w.kind(index) == "FULLY_CONNECTED" else 4):
        return None
    if len(inputs) > 2 and inputs[2] >= 0 and w.constant(inputs[2]) is None:
        return None
    return int(weights.shape[_OUT_AXIS[w.kind(index)]])


def _second(w: _Weights, first: int, channels: int) -> int | None:
    """The op that alone reads ``first``'s output as its data input and takes its channels as input channels."""
    out = ints(w.graph.operators[first].outputs)[0]
    readers = w.readers.get(out, [])
    if len(readers) != 1 or out in ints(w.graph.outputs):
        return None
    second = readers[0]
    inputs = ints(w.graph.operators[second].inputs)
    shape = [int(s) for s in w.graph.tensors[out].shape] if w.graph.tensors[out].shape is not None else []
    if _channels(w, second) is None or inputs.count(out) != 1 or inputs[0] != out or not shape or shape[-1] != channels:
        return None
    weights = w.constant(inputs[1])
    if weights is None or weights.shape[_IN_AXIS[w.kind(second)]] != channels:
        return None
    return second


def _pairs(w: _Weights) -> tuple[list[_Pair], int]:
    """Every pair the rewrite may balance, in graph order, and how many were skipped for their activation."""
    found, clipping = [], 0
    for first in range(len(w.graph.operators or [])):
        channels = _channels(w, first)
        second = None if channels is None else _second(w, first, channels)
        if channels is None or second is None:
            continue
        if w.activation(first) not in _EXACT:
            clipping += 1
            continue
        found.append(_Pair(first, second, np.ones(channels)))
    for index in sorted({p.first for p in found} | {p.second for p in found}):
        w.privatize(index)
    return found, clipping


def _ranges(values: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(np.abs(values), axis, 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1)


def _shaped(scale: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def _balance(w: _Weights, pair: _Pair) -> float:
    """One equalization step of ``pair`` in place; the largest |log s_c| it applied."""
    ops = w.graph.operators
    in1, in2 = ints(ops[pair.first].inputs), ints(ops[pair.second].inputs)
    kind1, kind2 = w.kind(pair.first), w.kind(pair.second)
    w1, w2 = w.array(in1[1]), w.array(in2[1])
    r1, r2 = _ranges(w1, _OUT_AXIS[kind1]), _ranges(w2, _IN_AXIS[kind2])
    usable = (r1 > 0) & (r2 > 0)
    s = np.where(usable, np.sqrt(np.where(usable, r1, 1.0) / np.where(usable, r2, 1.0)), 1.0)
    w.values[in1[1]] = w1 / _shaped(s, w1.ndim, _OUT_AXIS[kind1])
    if len(in1) > 2 and in1[2] >= 0:
        w.values[in1[2]] = w.array(in1[2]) / s
    w.values[in2[1]] = w2 * _shaped(s, w2.ndim, _IN_AXIS[kind2])
    pair.scale = pair.scale * s
    return float(np.max(np.abs(np.log(s)))) if s.size else 0.0


def _spread(ranges: np.ndarray) -> float:
    nonzero = ranges[ranges > 0]
    return float(nonzero.max() / nonzero.min()) if nonzero.size else 1.0


def _layer(w: _Weights, index: int) -> str:
    op = w.graph.operators[index]
    name = text(w.graph.tensors[ints(op.outputs)[0]].name)
    if not layer_names(name):  # a graph output named "Identity": its weights still name the layer
        name = text(w.graph.tensors[ints(op.inputs)[1]].name)
    return primary_layer(name, layer_names(name))


def equalize(model_bytes: bytes) -> tuple[bytes, EqualizeReport]:
    """The float model with every exact pair balanced (module docstring); the same bytes when there is none.

    The rewritten model computes the same function up to float32 rounding of the rescaled weights.
    """
    model = flatbuffers.read(model_bytes)
    if len(model.subgraphs) != 1:
        return model_bytes, EqualizeReport()
    w = _Weights(model)
    pairs, clipping = _pairs(w)
    if not pairs:
        return model_bytes, EqualizeReport(skipped_clipping=clipping)
    before = [_spread(_ranges(w.array(ints(w.graph.operators[p.second].inputs)[1]),
                              _IN_AXIS[w.kind(p.second)])) for p in pairs]
    sweeps = 0
    while sweeps < _SWEEPS:
        sweeps += 1
        if max(_balance(w, pair) for pair in pairs) < _CONVERGED:
            break
    entries = []
    for pair, spread in zip(pairs, before):
        second_weights = w.values[ints(w.graph.operators[pair.second].inputs)[1]]
        entries.append(EqualizedPair(_layer(w, pair.first), _layer(w, pair.second),
                                     f"{w.kind(pair.first)} -> {w.kind(pair.second)}", int(pair.scale.size), spread,
                                     _spread(_ranges(second_weights, _IN_AXIS[w.kind(pair.second)]))))
    _write_back(w, pairs)
    return flatbuffers.write(model), EqualizeReport(tuple(entries), sweeps, clipping)


def _write_back(w: _Weights, pairs: list[_Pair]) -> None:
    """Each rescaled weight and bias written back, each balanced middle tensor renamed."""
    firsts = {p.first for p in pairs}
    for index in sorted(firsts | {p.second for p in pairs}):
        inputs = ints(w.graph.operators[index].inputs)
        w.write(inputs[1])
        if index in firsts and len(inputs) > 2 and inputs[2] >= 0:
            w.write(inputs[2])
    for index in firsts:
        tensor = w.graph.tensors[ints(w.graph.operators[index].outputs)[0]]
        tensor.name = (text(tensor.name) + SUFFIX).encode()

"""The weighted layers of an int8 .tflite beside their float twins, their inputs on real data, and their constants
rewritten in place.

Why: learned weight rounding and bias correction change only the numbers in
the int8 weight and int32 bias buffers of CONV_2D, DEPTHWISE_CONV_2D and
FULLY_CONNECTED ops; scales, zero points, ops and tensors stay as the
quantizer wrote them, so the graph (and its XNNPACK partitions) is the one
that was validated. Both methods need, per layer, the float weights the
quantizer started from (the float .tflite of the same source: the quantizer
quantized exactly those), the layer's inputs on calibration images, and a way
to write new constants without re-serializing a 20 MB model per layer: the
buffers are patched through writable views of the flatbuffer itself.

Twins are matched by the op's output tensor name, which the converter gives
the float and the integer op alike (``pipeline.validation.layer_error`` relies
on the same fact).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from pipeline.core.preprocessing import quantize
from pipeline.tflite import flatbuffers
from pipeline.tflite.flatbuffers import text
from pipeline.tflite.layers import expose_tensors, layer_names, primary_layer
from pipeline.tflite.runtime import open_interpreter

WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_NUMPY = {"FLOAT32": np.float32, "INT8": np.int8, "INT32": np.int32, "UINT8": np.uint8, "INT64": np.int64,
          "INT16": np.int16}


@dataclass(frozen=True)
class WeightedLayer:
    """One int8 conv/depthwise/FC op and its float twin: tensor indices in each model and the window geometry."""

    name: str
    op: str
    quant_op: int
    quant_input: int
    quant_weights: int
    quant_bias: int | None
    quant_output: int
    float_input: int
    float_weights: int
    float_bias: int | None
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    same_padding: bool = False
    multiplier: int = 1


@dataclass(frozen=True)
class InputSums:
    """Per activation tensor of a float model, its sum over a set of inputs (float64, one image's shape; the
    ``pointwise_inputs`` pooled, 1x1x1xC), and how many inputs: what bias correction takes its float means
    from. The fast calibrator adds them up in its own pass over the calibration images (``weighted_inputs``),
    so bias correction need not run the float model again."""

    sums: dict[int, np.ndarray]
    count: int

    def covers(self, tensors: Iterable[int], count: int) -> bool:
        return self.count == count and all(t in self.sums for t in tensors)


def weighted_inputs(float_model: bytes) -> list[int]:
    """The input activation of each float-weight conv/depthwise/FC op of ``float_model`` (the ``float_input``
    of the layers ``weighted_layers`` pairs with an int8 model's)."""
    return list(_weighted_readers(Constants(float_model)))


def pointwise_inputs(float_model: bytes) -> set[int]:
    """Those of ``weighted_inputs`` that only 1x1 stride-1 convolutions read: every output position reads one
    input position, so each tap mean is the input's mean over all positions (``pool``), and the calibration
    need only add up one value per channel."""
    floating = Constants(float_model)
    found = set()
    for t, readers in _weighted_readers(floating).items():
        if all(name != "FULLY_CONNECTED" and floating.shape(ins[1])[1:3] == (1, 1)
               and _options(floating, floating.graph.Operators(index)).get("stride") == (1, 1)
               for index, name, ins in readers):
            found.add(t)
    return found


def _weighted_readers(floating: Constants) -> dict[int, list[tuple[int, str, list[int]]]]:
    """Input activation -> the float-weight conv/depthwise/FC ops reading it, in op order."""
    found: dict[int, list[tuple[int, str, list[int]]]] = {}
    for index, name, ins, outs in _ops(floating):
        if name in WEIGHTED_OPS and outs and len(ins) >= 2 and floating.dtype(ins[1]) is np.float32:
            found.setdefault(ins[0], []).append((index, name, ins))
    return found


def pool(x: np.ndarray) -> np.ndarray:
    """A 1xHxWxC activation as its mean over positions, 1x1x1xC: what a 1x1 stride-1 layer's tap means need."""
    return x.reshape(-1, x.shape[-1]).mean(axis=0).reshape(1, 1, 1, -1)



class Constants:
    """Read and patch the constant tensors of one subgraph model held in a bytearray (reader API, in place).

    Only same-sized rewrites: the flatbuffer's layout never changes. A buffer
    shared by several tensors (the converter deduplicates equal constants) is
    first given to each tensor on its own (``unshared``), so patching one
    layer's bias cannot change another's.
    """

    def __init__(self, model_bytes: bytes):
        self.data = bytearray(model_bytes)
        schema = flatbuffers.schema()
        self.model = schema.Model.GetRootAs(self.data, 0)
        if self.model.SubgraphsLength() != 1:
            raise ValueError("only single-subgraph models have their layers rewritten")
        self.graph = self.model.Subgraphs(0)
        self.types = flatbuffers.type_names()

    def tensor(self, t: int):
        return self.graph.Tensors(t)

    def shape(self, t: int) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor(t).ShapeAsNumpy())

    def dtype(self, t: int):
        return _NUMPY[self.types[self.tensor(t).Type()]]

    def view(self, t: int) -> np.ndarray:
        """A writable view of the tensor's constant data (shaped and typed)."""
        buffer = self.model.Buffers(self.tensor(t).Buffer())
        if buffer.DataLength() == 0:
            raise ValueError(f"tensor {t} has no constant data inside the flatbuffer")
        raw = buffer.DataAsNumpy()
        return raw.view(self.dtype(t)).reshape(self.shape(t))

    def quantization(self, t: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(scales, zero points, quantized dimension) of tensor ``t``."""
        q = self.tensor(t).Quantization()
        if q is None or q.ScaleLength() == 0:
            return np.zeros(0), np.zeros(0, dtype=np.int64), 0
        return (q.ScaleAsNumpy().astype(np.float64), q.ZeroPointAsNumpy().astype(np.int64),
                int(q.QuantizedDimension()))

    def bytes(self) -> bytes:
        return bytes(self.data)


def unshared(model_bytes: bytes, tensors: Iterable[int]) -> bytes:
    """The model in which each of ``tensors`` owns its buffer (a copy where the buffer was shared)."""
    wanted = {int(t) for t in tensors}
    if not _shares_a_buffer(Constants(model_bytes), wanted):
        return model_bytes  # the object API's read and write of the whole model cost more than the check
    model = flatbuffers.read(model_bytes)
    graph = model.subgraphs[0]
    users: dict[int, list[int]] = {}
    for index, tensor in enumerate(graph.tensors):
        users.setdefault(int(tensor.buffer), []).append(index)
    schema = flatbuffers.schema()
    changed = False
    for buffer, owners in users.items():
        targets = [o for o in owners if o in wanted]
        if len(owners) < 2 or not targets:
            continue
        if len(targets) == len(owners):
            targets = targets[1:]  # one of them keeps the original
        for t in targets:
            copy = schema.BufferT()
            copy.data = np.array(model.buffers[buffer].data, copy=True)
            model.buffers.append(copy)
            graph.tensors[t].buffer = len(model.buffers) - 1
            changed = True
    return flatbuffers.write(model) if changed else model_bytes


def _shares_a_buffer(constants: Constants, wanted: set[int]) -> bool:
    """Whether any of ``wanted`` shares its buffer with another tensor (read in place)."""
    users: dict[int, int] = {}
    for t in range(constants.graph.TensorsLength()):
        buffer = constants.tensor(t).Buffer()
        users[buffer] = users.get(buffer, 0) + 1
    return any(users[constants.tensor(t).Buffer()] > 1 for t in wanted)


def _options(constants: Constants, op) -> dict:
    """Window geometry from the op's builtin options (reader API)."""
    schema = flatbuffers.schema()
    table = op.BuiltinOptions()
    name = flatbuffers.op_names().get(flatbuffers.builtin_code(constants.model.OperatorCodes(op.OpcodeIndex())))
    if name == "FULLY_CONNECTED" or table is None:
        return {}
    options = schema.Conv2DOptions() if name == "CONV_2D" else schema.DepthwiseConv2DOptions()
    options.Init(table.Bytes, table.Pos)
    found = {"stride": (int(options.StrideH()), int(options.StrideW())),
             "dilation": (int(options.DilationHFactor()), int(options.DilationWFactor())),
             "same_padding": int(options.Padding()) == schema.Padding.SAME}
    if name == "DEPTHWISE_CONV_2D":
        found["multiplier"] = max(1, int(options.DepthMultiplier()))
    return found


def _ops(constants: Constants) -> list[tuple[int, str, list[int], list[int]]]:
    names = flatbuffers.op_names()
    found = []
    for i in range(constants.graph.OperatorsLength()):
        op = constants.graph.Operators(i)
        code = constants.model.OperatorCodes(op.OpcodeIndex())
        found.append((i, names.get(flatbuffers.builtin_code(code), "?"),
                      [int(t) for t in op.InputsAsNumpy()], [int(t) for t in op.OutputsAsNumpy()]))
    return found


def weighted_layers(quant_model: bytes, float_model: bytes) -> list[WeightedLayer]:
    """Every int8-weight conv/depthwise/FC op of ``quant_model`` with a float twin in ``float_model``, in op order."""
    quant, floating = Constants(quant_model), Constants(float_model)
    by_output = {text(floating.tensor(outs[0]).Name()): (ins, outs) for _, name, ins, outs in _ops(floating)
                 if name in WEIGHTED_OPS and outs}
    found = []
    for index, name, ins, outs in _ops(quant):
        if name not in WEIGHTED_OPS or len(ins) < 2 or quant.dtype(ins[1]) is not np.int8:
            continue
        if quant.dtype(ins[0]) is not np.int8:
            continue
        tensor_name = text(quant.tensor(outs[0]).Name())
        twin = by_output.get(tensor_name)
        if twin is None or floating.dtype(twin[0][1]) is not np.float32:
            continue
        weights_shape = quant.shape(ins[1])
        kernel = (weights_shape[1], weights_shape[2]) if name != "FULLY_CONNECTED" else (1, 1)
        bias = ins[2] if len(ins) > 2 and ins[2] >= 0 else None
        float_bias = twin[0][2] if len(twin[0]) > 2 and twin[0][2] >= 0 else None
        found.append(WeightedLayer(primary_layer(tensor_name, layer_names(tensor_name)), name, index, ins[0],
                                   ins[1], bias, outs[0], twin[0][0], twin[0][1], float_bias,
                                   kernel=kernel, **_options(quant, quant.graph.Operators(index))))
    return found


def levels(quant_model: bytes, layers: list[WeightedLayer]) -> list[list[WeightedLayer]]:
    """The layers grouped so that no layer's input depends on a layer of its own or a later group.

    Correcting a group changes only what later groups see, so each group is
    measured once, on the model with every earlier group already corrected.
    """
    constants = Constants(quant_model)
    producer: dict[int, tuple[int, list[int]]] = {}
    for index, _, ins, outs in _ops(constants):
        for t in outs:
            producer[t] = (index, ins)
    weighted = {layer.quant_op: layer for layer in layers}
    depth: dict[int, int] = {}  # op index -> weighted depth of its output

    def op_depth(index: int, ins: list[int]) -> int:
        if index in depth:
            return depth[index]
        upstream = max((tensor_depth(t) for t in ins if t >= 0), default=0)
        depth[index] = upstream + (1 if index in weighted else 0)
        return depth[index]

    def tensor_depth(t: int) -> int:
        return op_depth(*producer[t]) if t in producer else 0

    for index, _, ins, _ in _ops(constants):  # op order is topological: depths resolve without deep recursion
        op_depth(index, ins)
    groups: dict[int, list[WeightedLayer]] = {}
    for layer in layers:
        groups.setdefault(depth[layer.quant_op], []).append(layer)
    return [groups[k] for k in sorted(groups)]


def taps(x: np.ndarray, layer: WeightedLayer):
    """(i, j, window slice) for each kernel tap of a conv on one image ``x`` (HxWxC, zero padded as TFLite pads).

    The slice at tap (i, j) holds, for every output position, the input value
    that tap multiplies: a convolution is the sum over taps of slice @ weights.
    Zero padding is exact for the integer model too when ``x`` is the input
    minus its zero point.
    """
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.stride, layer.dilation
    height, width = x.shape[0], x.shape[1]
    if layer.same_padding:
        oh, ow = -(-height // sh), -(-width // sw)
        ph = max((oh - 1) * sh + (kh - 1) * dh + 1 - height, 0)
        pw = max((ow - 1) * sw + (kw - 1) * dw + 1 - width, 0)
        x = np.pad(x, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:
        oh, ow = (height - (kh - 1) * dh - 1) // sh + 1, (width - (kw - 1) * dw - 1) // sw + 1
    for i in range(kh):
        for j in range(kw):
            yield i, j, x[i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw, :]


def rows(x: np.ndarray, layer: WeightedLayer) -> np.ndarray:
    """A FULLY_CONNECTED input as rows of its input width (the op flattens all leading dimensions)."""
    return x.reshape(-1, x.shape[-1])


def tap_means(x: np.ndarray, layer: WeightedLayer) -> np.ndarray:
    """The mean over output positions of each tap's input (KH x KW x C; C for FC), in float64."""
    if layer.op == "FULLY_CONNECTED":
        return rows(x, layer).astype(np.float64).mean(axis=0)
    image = x.reshape(x.shape[-3:]) if x.ndim == 4 else x
    means = np.zeros((*layer.kernel, image.shape[-1]))
    for i, j, window in taps(image, layer):
        means[i, j] = window.astype(np.float64).mean(axis=(0, 1))
    return means


def output_means(weights: np.ndarray, means: np.ndarray, layer: WeightedLayer) -> np.ndarray:
    """The mean of the layer's output (before bias and activation) per output channel, from its tap means."""
    w = weights.astype(np.float64)
    if layer.op == "FULLY_CONNECTED":
        return w.reshape(w.shape[0], -1) @ means
    if layer.op == "DEPTHWISE_CONV_2D":
        expanded = np.repeat(means, layer.multiplier, axis=2)  # output channel c reads input c // multiplier
        return np.einsum("ijc,ijc->c", w[0], expanded)
    return np.tensordot(w, means, axes=3)


def run_exposing(model_bytes: bytes, tensors: list[int], inputs: Iterable[np.ndarray],
                 visit: Callable[[dict[int, np.ndarray]], None], *, exposed: bool = False) -> int:
    """Run the model on each float input (its own input quantization applied) and hand ``visit`` the values of
    ``tensors`` (as stored: integers for an integer tensor); returns how many inputs ran.

    ``exposed``: the model already has ``tensors`` among its outputs (``expose_tensors`` re-serializes the
    whole model, which costs more than the run on a small one).
    """
    probe = model_bytes if exposed else expose_tensors(model_bytes, tensors)
    interpreter = open_interpreter(probe, threads=max(1, os.cpu_count() or 1))
    detail = interpreter.get_input_details()[0]
    count = 0
    for x in inputs:
        interpreter.set_tensor(detail["index"], quantize(np.asarray(x, dtype=np.float32)[None], detail["dtype"],
                                                         *detail["quantization"]))
        interpreter.invoke()
        visit({t: interpreter.get_tensor(t) for t in tensors})
        count += 1
    return count


def workers_for(count: int) -> int:
    """Interpreters to run side by side: one per core (at most 4, as the fast calibrator), none idle."""
    return max(1, min(4, os.cpu_count() or 1, count))


def sum_exposing(model_bytes: bytes, tensors: list[int], inputs: list[np.ndarray]) -> tuple[dict[int, np.ndarray], int]:
    """The sum over ``inputs`` of each of ``tensors`` (float64, one image's shape), and how many inputs ran.

    One single-threaded interpreter per core, each on its share of the
    inputs (the fast calibrator's layout: many small ops scale better across
    interpreters than across one interpreter's threads); the shares' sums are
    added at the end.
    """
    probe = expose_tensors(model_bytes, tensors)
    workers = workers_for(len(inputs))

    def share(k: int) -> dict[int, np.ndarray]:
        interpreter = open_interpreter(probe, threads=1)
        detail = interpreter.get_input_details()[0]
        sums: dict[int, np.ndarray] = {}
        for x in inputs[k::workers]:
            interpreter.set_tensor(detail["index"], quantize(np.asarray(x, dtype=np.float32)[None], detail["dtype"],
                                                             *detail["quantization"]))
            interpreter.invoke()
            for t in tensors:
                view = interpreter.tensor(t)()[0]  # read before the next invoke; no reference kept
                if t in sums:
                    np.add(sums[t], view, out=sums[t])
                else:
                    sums[t] = view.astype(np.float64)
                del view
        return sums

    with ThreadPoolExecutor(max_workers=workers) as pool:
        shares = [found for found in pool.map(share, range(workers)) if found]
    total = {t: np.sum([found[t] for found in shares], axis=0) for t in tensors} if shares else {}
    return total, len(inputs)

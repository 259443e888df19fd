"""Put chosen layers of one conversion into another: flatbuffer surgery on two .tflite models of one source.

Why: TensorFlow 2.21 can keep a layer out of int8 only through the MLIR
quantizer's ``denylisted_nodes`` (``pipeline.conversion.float_fallback``); its int16x8
models come from the older quantizer, which has no such list, and mixing
int8 and int16 layers is not offered at all. But every conversion of one
source names its tensors alike (``xception_1/block7_sepconv2_bn_1/...``: the
float32, int8 and int16x8 models of the test model have the same ops in the
same order, with the same output names), so the ops of a layer can be taken
from another conversion (the *donor*: float32, or int16x8) and wired into the
quantized *host* with conversion ops at the boundary:

- each activation the spliced layers read gets a DEQUANTIZE (host int to
  float), a QUANTIZE (float to the donor's int16), or both: LiteRT's QUANTIZE
  requantizes int16 to int8 but not int8 to int16 (kernels/quantize.cc);
- each output read outside the spliced layers (or a graph output) is written
  back by a QUANTIZE (or DEQUANTIZE) into the host's own tensor, so every
  downstream op keeps the scale and zero point it was calibrated with;
- the donor ops' constants (weights, biases) are copied with their buffers;
  tensors and buffers no longer used are dropped.

The op order is a stable topological sort by original position, so each op
stays where it was and conversions sit next to their producer or consumer.
"""

from __future__ import annotations

import copy
import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.core.errors import ConversionError
from pipeline.tflite import flatbuffers
from pipeline.tflite.flatbuffers import ints, text
from pipeline.tflite.layers import layer_names, primary_layer



@dataclass
class _Graph:
    """One model's single subgraph, with op names, layers and tensor wiring worked out once."""

    model: Any  # a schema ModelT (generated, untyped)
    graph: Any = field(init=False)
    op_names: list[str] = field(init=False)
    op_layers: list[str | None] = field(init=False)
    producer: dict[int, int] = field(init=False)

    def __post_init__(self):
        if len(self.model.subgraphs) != 1:
            raise ConversionError(f"cannot splice a model with {len(self.model.subgraphs)} subgraphs "
                                  "(only single-graph models)")
        self.graph = self.model.subgraphs[0]
        self.op_names, self.op_layers, self.producer = [], [], {}
        for index, op in enumerate(self.graph.operators or []):
            self.op_names.append(flatbuffers.op_name(self.model, op))
            layer = None
            for t in ints(op.outputs):
                self.producer[t] = index
                name = self.name(t)
                names = layer_names(name)
                if names and layer is None:
                    layer = primary_layer(name, names)
            self.op_layers.append(layer)

    def name(self, t: int) -> str:
        return text(self.graph.tensors[t].name)

    def ops_of(self, layer: str) -> list[int]:
        return [i for i, found in enumerate(self.op_layers) if found == layer]



def _qparams(tensor) -> tuple[float, int] | None:
    q = tensor.quantization
    if q is None or q.scale is None or not len(q.scale):
        return None
    if len(q.scale) != 1:
        raise ConversionError(f"cannot splice at {text(tensor.name)}: per-channel quantized activation")
    return float(q.scale[0]), int(q.zeroPoint[0]) if q.zeroPoint is not None and len(q.zeroPoint) else 0


def splice(host_bytes: bytes, donor_bytes: bytes, layers, *, record: dict | None = None) -> bytes:
    """``host_bytes`` with the ops of ``layers`` (Keras layer names) replaced by those of ``donor_bytes``.

    Both models must be conversions of the same source (ops matched by the
    layer names in their output tensor names). ``record`` receives what was
    done: donor type, ops spliced, conversion ops added. Raises
    ``ConversionError`` naming the layer when a layer cannot be matched.
    """
    layers = list(dict.fromkeys(str(layer) for layer in layers))
    host = _Graph(flatbuffers.read(host_bytes))
    donor = _Graph(flatbuffers.read(donor_bytes))
    edit = _Splice(host, donor, _match_layers(host, donor, layers))
    edit.add_donor_ops()
    edit.write_back_outputs()
    edit.reorder()
    if record is not None:
        record.update({"method": "splice", "layers": layers,
                       "donor": _donor_kind(donor, edit.donor_ops, edit.types),
                       "ops": len(edit.donor_ops), "conversion_ops": dict(sorted(edit.conversions.items()))})
    return flatbuffers.write(host.model)


def _match_layers(host: _Graph, donor: _Graph, layers: list[str]) -> list[tuple[int, int]]:
    """(host op, donor op) pairs for ``layers``, matched in graph order by their output tensor names."""
    pairs: list[tuple[int, int]] = []
    for layer in layers:
        h_ops, d_ops = host.ops_of(layer), donor.ops_of(layer)
        if not h_ops:
            known = ", ".join(sorted({name for name in host.op_layers if name})[:8])
            raise ConversionError(f"cannot keep {layer} out of the quantized graph: no such layer in the converted "
                                  f"graph (layers look like: {known}, ...)")
        h_names = [[host.name(t) for t in ints(host.graph.operators[i].outputs)] for i in h_ops]
        d_names = [[donor.name(t) for t in ints(donor.graph.operators[i].outputs)] for i in d_ops]
        if h_names != d_names:
            ops = ", ".join(donor.op_names[i] for i in d_ops) or "none"
            raise ConversionError(f"cannot splice layer {layer}: the donor model computes it with other ops ({ops} "
                                  f"against {', '.join(host.op_names[i] for i in h_ops)}); not converted from the "
                                  "same source?")
        pairs.extend(zip(h_ops, d_ops))
    return pairs


class _Splice:
    """The host model under edit: the donor ops being added, the tensors, buffers and opcodes they need.

    Ops are collected with a rank (the host position they replace, plus a
    fraction for conversions) and put in order once, by ``reorder``.
    """

    def __init__(self, host: _Graph, donor: _Graph, pairs: list[tuple[int, int]]):
        self.schema = flatbuffers.schema()
        self.types = {code: name.lower() for code, name in flatbuffers.type_names().items()}
        self.host, self.donor = host, donor
        self.model, self.graph = host.model, host.graph
        self.replaced = {h for h, _ in pairs}
        self.donor_ops = {d for _, d in pairs}
        self.rank = {d: float(h) for h, d in pairs}
        self.opcode_cache: dict[tuple, int] = {}
        self.new_ops: list[tuple[float, Any]] = []  # (rank, schema OperatorT)
        self.conversions: dict[str, int] = {}
        self.mapped: dict[int, int] = {}  # donor tensor -> host tensor
        self.buffer_map: dict[int, int] = {}  # donor buffer -> host buffer
        self.donor_inputs = set(ints(donor.graph.inputs))
        self.empty_buffer = self._empty_buffer()
        # Host activations by name: where the spliced ops read from and write back to.
        graph_inputs = set(ints(self.graph.inputs))
        self.host_activation = {host.name(t): t for t in range(len(self.graph.tensors))
                                if (t in host.producer and host.producer[t] not in self.replaced) or t in graph_inputs}
        self.host_written = {host.name(t): t for t in range(len(self.graph.tensors))
                             if t in host.producer and host.producer[t] in self.replaced}

    def _empty_buffer(self) -> int:
        """A buffer with no data, for the new activation tensors (the host's own, or one added)."""
        empty = next((i for i, b in enumerate(self.model.buffers) if b.data is None or not len(b.data)), None)
        if empty is None:
            self.model.buffers.append(self.schema.BufferT())
            empty = len(self.model.buffers) - 1
        return empty

    def opcode(self, builtin: int, version: int, custom=None) -> int:
        """The host's operator code index for this op kind, added to the host when it has none."""
        key = (builtin, version, text(custom) if custom else None)
        if key not in self.opcode_cache:
            for i, code in enumerate(self.model.operatorCodes):
                if (flatbuffers.builtin_code(code), int(code.version),
                        text(code.customCode) if code.customCode else None) == key:
                    self.opcode_cache[key] = i
                    break
            else:
                code = self.schema.OperatorCodeT()
                code.builtinCode, code.deprecatedBuiltinCode = builtin, min(builtin, 127)
                code.version, code.customCode = version, custom
                self.model.operatorCodes.append(code)
                self.opcode_cache[key] = len(self.model.operatorCodes) - 1
        return self.opcode_cache[key]

    def add_tensor(self, tensor) -> int:
        self.graph.tensors.append(tensor)
        return len(self.graph.tensors) - 1

    def activation_like(self, template, name: str, as_float: bool = False) -> int:
        """A new activation tensor shaped like ``template``, of its type and quantization or plain float32."""
        tensor = copy.deepcopy(template)
        tensor.name, tensor.buffer = name, self.empty_buffer
        if as_float:
            tensor.type, tensor.quantization = self.schema.TensorType.FLOAT32, None
        return self.add_tensor(tensor)

    def convert_op(self, kind: str, src: int, dst: int, at: float) -> None:
        """Add a QUANTIZE or DEQUANTIZE op from ``src`` to ``dst`` at rank ``at``, and count it."""
        schema = self.schema
        src_type, dst_type = self.graph.tensors[src].type, self.graph.tensors[dst].type
        if kind == "DEQUANTIZE":
            version = {schema.TensorType.INT8: 2, schema.TensorType.INT16: 3}.get(src_type, 1)
            options_type, options = schema.BuiltinOptions.DequantizeOptions, schema.DequantizeOptionsT()
        else:
            version = 2 if dst_type == schema.TensorType.INT16 else 1
            options_type, options = schema.BuiltinOptions.QuantizeOptions, schema.QuantizeOptionsT()
        op = schema.OperatorT()
        op.opcodeIndex = self.opcode(getattr(schema.BuiltinOperator, kind), version)
        op.inputs, op.outputs = [src], [dst]
        op.builtinOptionsType, op.builtinOptions = options_type, options
        self.new_ops.append((at, op))
        self.conversions[kind] = self.conversions.get(kind, 0) + 1

    def same(self, a, b) -> bool:
        """Tensors one op can read in place of the other: same type and, if quantized, same parameters."""
        return a.type == b.type and (a.type == self.schema.TensorType.FLOAT32 or _qparams(a) == _qparams(b))

    def bridge(self, src: int, dst: int, at: float, step: float) -> None:
        """Ops that turn tensor ``src`` into tensor ``dst`` (both in the host, not ``same``), at rank ``at``."""
        float32, int16 = self.schema.TensorType.FLOAT32, self.schema.TensorType.INT16
        a, b = self.graph.tensors[src], self.graph.tensors[dst]
        if a.type == float32:
            self.convert_op("QUANTIZE", src, dst, at)
        elif b.type == float32:
            self.convert_op("DEQUANTIZE", src, dst, at)
        elif b.type == int16 and a.type != int16:  # no int8 -> int16 requantize in LiteRT: through float
            middle = self.activation_like(a, f"{text(a.name)}_float32", as_float=True)
            self.convert_op("DEQUANTIZE", src, middle, at)
            self.convert_op("QUANTIZE", middle, dst, at + step / 2)
        else:  # int16 -> int8, or a requantize within one type
            self.convert_op("QUANTIZE", src, dst, at)

    def constant(self, t: int) -> int:
        """A copy of donor constant ``t`` (weights, biases, axes) in the host, with its buffer copied once."""
        tensor = copy.deepcopy(self.donor.graph.tensors[t])
        source = self.donor.model.buffers[tensor.buffer]
        if source.offset:
            raise ConversionError("cannot splice a model whose weights live outside the flatbuffer (over 2 GB)")
        if tensor.buffer not in self.buffer_map:
            buffer = self.schema.BufferT()
            buffer.data = np.array(source.data, dtype=np.uint8, copy=True)
            self.model.buffers.append(buffer)
            self.buffer_map[tensor.buffer] = len(self.model.buffers) - 1
        tensor.buffer = self.buffer_map[tensor.buffer]
        return self.add_tensor(tensor)

    def read(self, t: int, layer_of_op: str | None, at: float) -> int:
        """The host tensor a donor op reads in place of donor tensor ``t``."""
        donor = self.donor
        if t in self.mapped:  # produced by a spliced op, or already read
            return self.mapped[t]
        if t not in donor.producer and t not in self.donor_inputs:  # weights, biases, axes
            self.mapped[t] = self.constant(t)
        else:  # an activation of the host: converted to what the donor op expects
            name = donor.name(t)
            source = self.host_activation.get(name)
            if source is None:
                raise ConversionError(f"cannot splice layer {layer_of_op}: its input {name} has no tensor of that "
                                      "name in the quantized model")
            wanted = donor.graph.tensors[t]
            if self.same(self.graph.tensors[source], wanted):
                self.mapped[t] = source
            else:
                target = self.activation_like(wanted, f"{name}_{self.types[wanted.type]}")
                self.bridge(source, target, at - 0.5, 0.5)
                self.mapped[t] = target
        return self.mapped[t]

    def add_donor_ops(self) -> None:
        """Copy the donor ops into the host, each reading host tensors (converted where needed)."""
        donor = self.donor
        for d in sorted(self.donor_ops):  # donor order: producers before consumers
            for t in ints(donor.graph.operators[d].outputs):
                self.mapped[t] = self.activation_like(donor.graph.tensors[t], donor.name(t))
        for d in sorted(self.donor_ops):
            source_op = donor.graph.operators[d]
            layer = donor.op_layers[d]
            op = copy.deepcopy(source_op)
            code = donor.model.operatorCodes[source_op.opcodeIndex]
            op.opcodeIndex = self.opcode(flatbuffers.builtin_code(code), int(code.version), code.customCode)
            op.inputs = [self.read(t, layer, self.rank[d]) if t >= 0 else t for t in ints(source_op.inputs)]
            op.outputs = [self.mapped[t] for t in ints(source_op.outputs)]
            op.intermediates = ([self.activation_like(donor.graph.tensors[t], donor.name(t))
                                 for t in ints(op.intermediates)] or None)
            self.new_ops.append((self.rank[d], op))

    def write_back_outputs(self) -> None:
        """Outputs read outside the spliced ops: converted back into the host's own tensors."""
        donor, graph = self.donor, self.graph
        consumed_outside = set(ints(graph.outputs))
        for index, op in enumerate(graph.operators):
            if index not in self.replaced:
                consumed_outside.update(t for t in ints(op.inputs) if t >= 0)
        produced_inside = {t for d in self.donor_ops for t in ints(donor.graph.operators[d].outputs)}
        donor_output = {donor.name(t): t for t in produced_inside}
        for name, h in self.host_written.items():
            if h not in consumed_outside:
                continue
            d = donor_output.get(name)
            if d is None:
                raise ConversionError(f"cannot splice layer {self.host.op_layers[self.host.producer[h]]}: the donor "
                                      f"model has no output named {name}")
            copy_of = self.mapped[d]
            if self.same(graph.tensors[copy_of], graph.tensors[h]):
                for _, op in self.new_ops:  # the donor op writes the host tensor itself
                    op.outputs = [h if t == copy_of else t for t in ints(op.outputs)]
                    op.inputs = [h if t == copy_of else t for t in ints(op.inputs)]
                continue
            graph.tensors[copy_of].name = f"{name}_{self.types[graph.tensors[copy_of].type]}"
            self.bridge(copy_of, h, self.rank[donor.producer[d]] + 0.25, 0.25)

    def reorder(self) -> None:
        """Replace the host's ops by the kept and new ones in dependency order, then drop what is unused."""
        kept = [(float(i), op) for i, op in enumerate(self.graph.operators) if i not in self.replaced]
        self.graph.operators = _topological(kept + self.new_ops)
        _drop_unused(self.model)


def _donor_kind(donor: _Graph, ops, types) -> str:
    """What the spliced ops compute in: the type of their outputs (float32, int16, ...)."""
    found = {types[donor.graph.tensors[t].type] for d in ops for t in ints(donor.graph.operators[d].outputs)}
    return "/".join(sorted(found))


def _topological(ranked) -> list:
    """The ops in dependency order, each as near its rank as the dependencies allow (stable)."""
    producers = {}
    for k, (_, op) in enumerate(ranked):
        for t in ints(op.outputs):
            producers[t] = k
    waiting = {}
    dependents: dict[int, list[int]] = {}
    for k, (_, op) in enumerate(ranked):
        needs = {producers[t] for t in ints(op.inputs) if t in producers}
        waiting[k] = len(needs)
        for p in needs:
            dependents.setdefault(p, []).append(k)
    ready = [(ranked[k][0], k) for k, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, k = heapq.heappop(ready)
        order.append(ranked[k][1])
        for j in dependents.get(k, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, (ranked[j][0], j))
    if len(order) != len(ranked):
        raise ConversionError("cannot splice: the spliced graph has a cycle")
    return order


def _drop_unused(model) -> None:
    """Remove tensors no op or graph end refers to, then buffers no tensor or metadata refers to."""
    graph = model.subgraphs[0]
    used = set(ints(graph.inputs)) | set(ints(graph.outputs))
    for op in graph.operators:
        used.update(t for t in ints(op.inputs) + ints(op.outputs) + ints(op.intermediates) if t >= 0)
    for signature in model.signatureDefs or []:
        used.update(int(m.tensorIndex) for m in (signature.inputs or []) + (signature.outputs or []))
    tensor_map = {old: new for new, old in enumerate(sorted(used))}
    graph.tensors = [graph.tensors[old] for old in sorted(used)]

    def remap(values):
        return [tensor_map[int(t)] if int(t) >= 0 else int(t) for t in values] if values is not None else values

    graph.inputs, graph.outputs = remap(graph.inputs), remap(graph.outputs)
    for op in graph.operators:
        op.inputs, op.outputs = remap(op.inputs), remap(op.outputs)
        if op.intermediates is not None:
            op.intermediates = remap(op.intermediates)
    for signature in model.signatureDefs or []:
        for m in (signature.inputs or []) + (signature.outputs or []):
            m.tensorIndex = tensor_map[int(m.tensorIndex)]
    buffers = {0} | {int(t.buffer) for t in graph.tensors}
    buffers.update(int(m.buffer) for m in model.metadata or [])
    buffers.update(ints(model.metadataBuffer))
    buffer_map = {old: new for new, old in enumerate(sorted(buffers))}
    model.buffers = [model.buffers[old] for old in sorted(buffers)]
    for t in graph.tensors:
        t.buffer = buffer_map[int(t.buffer)]
    for m in model.metadata or []:
        m.buffer = buffer_map[int(m.buffer)]
    if model.metadataBuffer is not None:
        model.metadataBuffer = [buffer_map[int(b)] for b in model.metadataBuffer]


__all__ = ["splice"]

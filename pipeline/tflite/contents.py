"""What is inside a .tflite: inputs/outputs with quantization, ops by dtype.

Read from the flatbuffer itself (no interpreter), so a manifest can say which
ops stayed float and which layers they came from: tensor names carry the
Keras layer names (``xception/block7_sepconv2/...``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pipeline.core.errors import ModelLoadError
from pipeline.tflite import flatbuffers
from pipeline.tflite.flatbuffers import read

HEAVY_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_BOUNDARY_OPS = {"QUANTIZE", "DEQUANTIZE"}
_FLOAT = {"float32", "float16", "float64", "bfloat16"}


@dataclass
class TfliteInfo:
    inputs: list[dict]
    outputs: list[dict]
    op_histogram: dict[str, int]
    weight_dtypes: dict[str, int]
    float_ops: list[dict]
    heavy_float_ops: list[dict]
    operator_count: int
    subgraphs: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"inputs": self.inputs, "outputs": self.outputs, "op_histogram": self.op_histogram,
                "weight_dtypes": self.weight_dtypes,
                "ops_left_float": self.float_ops, "operator_count": self.operator_count}

    @property
    def int_op_count(self) -> int:
        return sum(n for key, n in self.op_histogram.items()
                   if key.split("/")[1] in ("int8", "int16", "uint8", "int32") and key.split("/")[0] not in _BOUNDARY_OPS)

    @property
    def float_op_count(self) -> int:
        return len(self.float_ops)


def _type_names():
    return {code: name.lower() for code, name in flatbuffers.type_names().items()}


def _op_names():
    return flatbuffers.op_names()


def _tensor_desc(tensor, types) -> dict:
    q = tensor.quantization
    scale = float(q.scale[0]) if q is not None and q.scale is not None and len(q.scale) else 0.0
    zero = int(q.zeroPoint[0]) if q is not None and q.zeroPoint is not None and len(q.zeroPoint) else 0
    name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
    shape = [int(s) for s in (tensor.shape if tensor.shape is not None else [])]
    return {"name": name, "dtype": types.get(tensor.type, str(tensor.type)), "shape": shape,
            "scale": scale, "zero_point": zero}


def read_model_object(model_bytes: bytes):
    return read(model_bytes)


def inspect_tflite(model_bytes: bytes) -> TfliteInfo:
    """What the model holds; ``ModelLoadError`` for a flatbuffer whose indices or names are wrong (an operator
    naming a tensor or opcode past its list, a name that is not UTF-8)."""
    model = read_model_object(model_bytes)
    try:
        return _inspect(model)
    except flatbuffers.MALFORMED as exc:
        raise ModelLoadError(f"invalid model: its graph cannot be read ({type(exc).__name__}: "
                             f"{str(exc)[:100]})") from None


def _inspect(model) -> TfliteInfo:
    types, ops = _type_names(), _op_names()
    graph = model.subgraphs[0]
    tensors = graph.tensors
    hist: Counter[str] = Counter()
    float_ops: list[dict] = []
    heavy_float: list[dict] = []
    weights: Counter[str] = Counter()
    produced_by_dequantize = {}
    for op in graph.operators or []:
        code = model.operatorCodes[op.opcodeIndex]
        if ops.get(flatbuffers.builtin_code(code)) == "DEQUANTIZE":
            produced_by_dequantize[int(op.outputs[0])] = int(op.inputs[0])
    for op in graph.operators or []:
        code = model.operatorCodes[op.opcodeIndex]
        builtin = flatbuffers.builtin_code(code)
        name = ops.get(builtin, f"OP_{builtin}")
        if name == "CUSTOM":
            custom = code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
            name = f"CUSTOM:{custom}"
        out = tensors[op.outputs[0]] if op.outputs is not None and len(op.outputs) else None
        dtype = types.get(out.type, "?") if out is not None else "none"
        hist[f"{name}/{dtype}"] += 1
        if name in HEAVY_OPS and op.inputs is not None and len(op.inputs) > 1:
            # The stored weight type: fp16 and some hybrid models feed weights through a DEQUANTIZE op.
            w = int(op.inputs[1])
            weights[types.get(tensors[produced_by_dequantize.get(w, w)].type, "?")] += 1
        if out is not None and dtype in _FLOAT and name not in _BOUNDARY_OPS:
            out_name = out.name.decode() if isinstance(out.name, bytes) else str(out.name)
            entry = {"op": name, "output": out_name}
            float_ops.append(entry)
            if name in HEAVY_OPS:
                heavy_float.append(entry)
    inputs = [_tensor_desc(tensors[i], types) for i in graph.inputs]
    outputs = [_tensor_desc(tensors[i], types) for i in graph.outputs]
    return TfliteInfo(inputs=inputs, outputs=outputs, op_histogram=dict(sorted(hist.items())),
                      weight_dtypes=dict(sorted(weights.items())),
                      float_ops=float_ops, heavy_float_ops=heavy_float,
                      operator_count=len(graph.operators or []), subgraphs=len(model.subgraphs))

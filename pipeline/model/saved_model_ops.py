"""Which TensorFlow ops a SavedModel holds, read from its protobuf before TensorFlow loads anything.

Loading a SavedModel runs its resource initializers, and validation runs its
signature, so its graph is a program. ``unsafe_saved_model_ops`` lists every
op of the meta graph and of every function of its library that is outside
``SAFE_TF_OPS`` (tensor maths, the model's own variables, calls and control
flow whose bodies are checked too); the checkpoint ops are accepted only in
what the saver alone reaches (its save and restore functions).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from google.protobuf import message, text_format

from pipeline.core.errors import ModelLoadError

# TensorFlow ops a SavedModel may hold unless its code is trusted (``trust_code``): computation on tensors and on
# the model's own variables, function calls and control flow (their bodies are checked as functions of the
# library), asserts and random numbers. No op here reads or writes a file, talks to the network or calls back
# into Python (tests/test_bad_input.py checks that each name is a registered op and which ones TensorFlow calls
# stateful).
SAFE_TF_OPS = frozenset("""
Const Identity IdentityN NoOp Placeholder PlaceholderWithDefault StopGradient PreventGradient Snapshot EnsureShape
CheckNumerics CheckNumericsV2 Assert
VarHandleOp ReadVariableOp AssignVariableOp AssignAddVariableOp AssignSubVariableOp VarIsInitializedOp
VariableV2 Variable Assign AssignAdd AssignSub IsVariableInitialized
PartitionedCall StatefulPartitionedCall If StatelessIf While StatelessWhile Case StatelessCase
Switch Merge Enter Exit NextIteration LoopCond ControlTrigger
Add AddV2 AddN Sub Mul MulNoNan Div DivNoNan RealDiv TruncateDiv FloorDiv FloorMod Mod TruncateMod
Maximum Minimum Neg Abs Sign Square Sqrt Rsqrt Reciprocal Inv Exp Expm1 Log Log1p Pow SquaredDifference
Tanh Sigmoid Erf Erfc Sin Cos Atan Atan2 Floor Ceil Round Rint IsNan IsInf IsFinite
Equal NotEqual Less LessEqual Greater GreaterEqual LogicalAnd LogicalOr LogicalNot Select SelectV2
ClipByValue Cast MatMul BatchMatMul BatchMatMulV2 BatchMatMulV3 Einsum
Sum Mean Max Min Prod All Any ArgMax ArgMin Cumsum Cumprod
Conv2D Conv3D Conv2DBackpropInput Conv3DBackpropInputV2 DepthwiseConv2dNative BiasAdd
Relu Relu6 Elu Selu LeakyRelu Softplus Softsign Softmax LogSoftmax
MaxPool MaxPoolV2 MaxPool3D AvgPool AvgPool3D FusedBatchNorm FusedBatchNormV2 FusedBatchNormV3 LRN
ResizeBilinear ResizeNearestNeighbor ResizeBicubic ResizeArea TopKV2 InTopKV2
Reshape Shape ShapeN Size Rank Squeeze ExpandDims Transpose ConcatV2 Concat Pack Unpack Split SplitV
Slice StridedSlice Tile Pad PadV2 MirrorPad Fill ZerosLike OnesLike Range LinSpace
Gather GatherV2 GatherNd BroadcastTo BroadcastArgs BroadcastGradientArgs ReverseV2 OneHot Where
SpaceToBatchND BatchToSpaceND SpaceToDepth DepthToSpace MatrixBandPart
FakeQuantWithMinMaxVars FakeQuantWithMinMaxVarsPerChannel FakeQuantWithMinMaxArgs
RandomUniform RandomStandardNormal TruncatedNormal RandomUniformInt
StatelessRandomUniformV2 StatelessRandomNormalV2 StatelessTruncatedNormalV2 StatelessRandomGetKeyCounter
""".split())
# Accepted only in the functions (and graph nodes) that the SavedModel's saver alone reaches: its save function,
# which nothing here runs, and its restore function, which reads the model's own variables.
SAVE_OPS = frozenset({"SaveV2", "MergeV2Checkpoints", "ShardedFilename", "StringJoin", "StaticRegexFullMatch",
                      "DisableCopyOnRead"})
RESTORE_OPS = frozenset({"RestoreV2"})


def _read_saved_model_proto(path: Path):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    binary = path / "saved_model.pb"
    try:
        if binary.exists():
            proto.ParseFromString(binary.read_bytes())
        else:
            text_format.Parse((path / "saved_model.pbtxt").read_text(), proto)
    except (OSError, UnicodeDecodeError, message.DecodeError, text_format.ParseError) as exc:
        raise ModelLoadError(f"cannot read SavedModel {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    return proto


def _tensor_nodes(info) -> set[str]:
    """Graph node names behind a signature's TensorInfo (plain, sparse or composite)."""
    encoding = info.WhichOneof("encoding")
    if encoding == "name":
        return {info.name.split(":")[0]}
    if encoding == "coo_sparse":
        sparse = info.coo_sparse
        return {n.split(":")[0] for n in (sparse.values_tensor_name, sparse.indices_tensor_name,
                                           sparse.dense_shape_tensor_name) if n}
    if encoding == "composite_tensor":
        return set().union(*(_tensor_nodes(c) for c in info.composite_tensor.components))
    return set()


def _called_functions(node, library: set[str]) -> set[str]:
    called = {node.op} & library  # a node can call a library function by using its name as the op
    for attr in node.attr.values():
        if attr.HasField("func"):
            called.add(attr.func.name)
        if attr.HasField("list"):
            called.update(f.name for f in attr.list.func)
    return called


def unsafe_saved_model_ops(path: str | os.PathLike) -> dict[str, list[str]]:
    """Ops of a SavedModel outside ``SAFE_TF_OPS``: op name -> where (function or graph node names).

    Read from ``saved_model.pb`` as a protobuf: nothing is loaded or run. A
    graph node reached from a signature, or from anything but the saver, gets
    the strict list; so does every function called from such a node, referred
    to by the object graph, or not called at all. Only what the saver's save
    (or restore) node alone reaches may also hold the save (or restore) ops.
    """
    proto = _read_saved_model_proto(Path(path))
    found: dict[str, set[str]] = {}
    for meta in proto.meta_graphs:
        _collect_unsafe(meta, found)
    return {op: sorted(where) for op, where in sorted(found.items())}


def _collect_unsafe(meta, found: dict[str, set[str]]) -> None:
    """Add one meta graph's disallowed ops (op -> node or function names) to ``found``."""
    graph = meta.graph_def
    functions = {f.signature.name: f for f in graph.library.function}
    context = _node_contexts(meta)
    reached = _reached_functions(meta, functions, context)

    def allowed(op: str, ctx: str) -> bool:
        return (op in SAFE_TF_OPS or op in functions or (ctx == "save" and op in SAVE_OPS)
                or (ctx == "restore" and op in RESTORE_OPS))

    for node in graph.node:
        if not allowed(node.op, context(node.name)):
            found.setdefault(node.op, set()).add(node.name)
    for name, fn in functions.items():
        contexts = {ctx for ctx, names in reached.items() if name in names}
        ctx = contexts.pop() if contexts in ({"save"}, {"restore"}) else "strict"
        for node in fn.node_def:
            if not allowed(node.op, ctx):
                found.setdefault(node.op, set()).add(name)


def _node_contexts(meta) -> Callable[[str], str]:
    """Graph node name -> "strict", "save" or "restore": which list of ops applies to it.

    A node only the saver's save (or restore) op reaches is on that side; a
    node reached from a signature, or from anything else, is strict."""
    nodes = {n.name: n for n in meta.graph_def.node}

    def closure(roots) -> set[str]:
        seen, stack = set(), [r for r in roots if r in nodes]
        while stack:
            name = stack.pop()
            if name not in seen:
                seen.add(name)
                stack.extend(ref.lstrip("^").split(":")[0] for ref in nodes[name].input)
        return seen & nodes.keys()

    saver = meta.saver_def
    save_side = closure([saver.save_tensor_name.split(":")[0]] if saver.save_tensor_name else [])
    restore_side = closure([saver.restore_op_name.split(":")[0]] if saver.restore_op_name else [])
    roots = set(nodes) - save_side - restore_side
    for signature in meta.signature_def.values():
        for info in [*signature.inputs.values(), *signature.outputs.values()]:
            roots |= _tensor_nodes(info)
    strict = closure(roots)

    def context(name: str) -> str:
        if name in strict:
            return "strict"
        if name in save_side and name not in restore_side:
            return "save"
        return "restore" if name in restore_side and name not in save_side else "strict"

    return context


def _reached_functions(meta, functions: dict, context: Callable[[str], str]) -> dict[str, set[str]]:
    """Context -> the library functions called from graph nodes in it (the object graph's are strict),
    transitively through the functions they call."""
    library = set(functions)
    reached: dict[str, set[str]] = {"strict": set(), "save": set(), "restore": set()}
    for node in meta.graph_def.node:
        reached[context(node.name)] |= _called_functions(node, library)
    for obj in meta.object_graph_def.nodes:
        kind = obj.WhichOneof("kind")
        if kind == "function":
            reached["strict"].update(obj.function.concrete_functions)
        elif kind == "bare_concrete_function":
            reached["strict"].add(obj.bare_concrete_function.concrete_function_name)
    for names in reached.values():
        stack = list(names)
        while stack:
            fn = functions.get(stack.pop())
            for node in fn.node_def if fn is not None else ():
                for callee in _called_functions(node, library) - names:
                    names.add(callee)
                    stack.append(callee)
    return reached

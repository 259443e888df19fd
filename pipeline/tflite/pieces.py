"""Run a .tflite model piece by piece, each op once, keeping the tensors later pieces read.

Why: bias correction measures each group of layers on the model with every
earlier group already corrected, so it needs the layers' inputs after each
correction. Running the whole model again per group costs one full pass per
layer depth (53 on MobileNetV2); but a correction changes only what is
downstream of the corrected layers, and those are not computed yet when it is
made. So each piece runs only the ops that the requested tensors need and no
earlier piece ran, as a small model of its own (the same ops, tensors,
quantization and constants, cut out of the flatbuffer), fed with the stored
values of the tensors it reads: in all, one pass over the model's ops per
image, whatever the number of pieces.

A constant patched between pieces (``patch``) is seen by every later piece;
a piece never re-runs an op, so a constant must be patched before the first
piece that runs its op.

Each piece runs on chunks of images at once where every op in it computes
each image on its own (convolutions, elementwise ops, pools, means over
space: ``_PER_IMAGE_OPS``): integer kernels give the same bits for an image
alone or in a batch, and one invoke per chunk spares the per-image calls that
cost more than a small piece's arithmetic. Any other piece, or one whose
outputs do not come out with the chunk as their first dimension, runs image
by image.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline.core.preprocessing import quantize
from pipeline.tflite import flatbuffers
from pipeline.tflite.runtime import open_interpreter
from pipeline.tflite.weighted_layers import workers_for

# Ops that compute each image of a batch on its own whatever their options; the axis-bearing ones are checked
# in ``_per_image`` (a concatenation or reduction over the batch axis, or padding of it, mixes images).
_PER_IMAGE_OPS = frozenset({
    "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "SUB", "MUL", "AVERAGE_POOL_2D", "MAX_POOL_2D",
    "RELU", "RELU6", "RELU_N1_TO_1", "LEAKY_RELU", "PRELU", "HARD_SWISH", "LOGISTIC", "TANH", "QUANTIZE",
    "DEQUANTIZE", "SOFTMAX", "MAXIMUM", "MINIMUM"})
_AXIS_OPS = frozenset({"CONCATENATION", "MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "PAD", "PADV2"})
CHUNK_BYTES = 32 << 20  # a worker's piece tensors for one chunk of images: a few cache-sized slabs, no more


def _ints(values) -> list[int]:
    return [int(v) for v in values] if values is not None else []


class PiecewiseRun:
    """One model run piecewise over a fixed list of float inputs (the model's own input quantization applied).

    Every tensor is stored for all inputs at once, as one array: the input's index first, then the tensor's
    own shape (its leading 1 included).
    """

    def __init__(self, model_bytes: bytes, inputs):
        self.model = flatbuffers.read(model_bytes)
        if len(self.model.subgraphs) != 1:
            raise ValueError("only single-subgraph models run piecewise")
        self.graph = self.model.subgraphs[0]
        self.producer: dict[int, int] = {}
        self.readers: dict[int, set[int]] = {}
        for index, op in enumerate(self.graph.operators):
            for t in _ints(op.outputs):
                self.producer[t] = index
            for t in _ints(op.inputs):
                if t >= 0:
                    self.readers.setdefault(t, set()).add(index)
        self.done: set[int] = set()
        self.count = len(inputs)
        self.stored: dict[int, np.ndarray] = {}
        for t in _ints(self.graph.inputs):  # image by image: a whole-set temporary costs a page fault per page
            self.stored[t] = np.empty((self.count, *self._shape(t)), self._dtype(t))
            for i, x in enumerate(inputs):
                self.stored[t][i] = self._model_input(t, np.asarray(x, dtype=np.float32)[None])
        self.pieces = 0
        self.ops_run = 0
        self.batched = 0  # pieces run a chunk of images per invoke
        self.spare: dict[tuple, list[np.ndarray]] = {}
        # One pool for every piece: starting its threads again per piece cost more than a small piece's run.
        self.workers = workers_for(self.count)
        self.shares = [(k * self.count // self.workers, (k + 1) * self.count // self.workers)
                       for k in range(self.workers)]
        self.pool = ThreadPoolExecutor(max_workers=self.workers)

    def __enter__(self) -> "PiecewiseRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _model_input(self, t: int, x: np.ndarray) -> np.ndarray:
        dtype = self._dtype(t)
        q = self.graph.tensors[t].quantization
        if np.dtype(dtype).kind == "f" or q is None or q.scale is None or len(q.scale) == 0:
            return x.astype(dtype)
        return quantize(x, dtype, float(q.scale[0]), int(q.zeroPoint[0]))

    def _dtype(self, t: int):
        return {"FLOAT32": np.float32, "INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16, "INT32": np.int32}[
            flatbuffers.type_names()[self.graph.tensors[t].type]]

    def _shape(self, t: int) -> tuple[int, ...]:
        return tuple(_ints(self.graph.tensors[t].shape))

    def constant(self, t: int) -> bool:
        data = self.model.buffers[int(self.graph.tensors[t].buffer)].data
        return data is not None and len(data) > 0

    def patch(self, t: int, values: np.ndarray) -> None:
        """Give constant tensor ``t`` new values of the same type and size (seen by the pieces run from now on)."""
        buffer = self.model.buffers[int(self.graph.tensors[t].buffer)]
        raw = np.ascontiguousarray(values).view(np.uint8).reshape(-1)
        if len(raw) != len(buffer.data):
            raise ValueError(f"tensor {t}: {len(raw)} bytes for a buffer of {len(buffer.data)}")
        buffer.data = raw.copy()

    def values(self, tensors) -> dict[int, np.ndarray]:
        """The values of ``tensors`` on every input (as stored: integers for an integer tensor; input index
        first), running the ops they need that no earlier call ran."""
        wanted = [int(t) for t in tensors]
        ops = self._needed(wanted)
        if ops:
            self._run(ops, wanted, None)
        found = {t: self.stored[t] for t in wanted}
        self._forget(handed_out=frozenset(wanted))
        return found

    def sums(self, tensors) -> dict[int, np.ndarray]:
        """The sum over every input of each of ``tensors`` (int64, the tensor's own shape; integer tensors),
        running the ops they need that no earlier call ran: added up by the workers as they make them."""
        wanted = [int(t) for t in tensors]
        ops = self._needed(wanted)
        totals: dict[int, np.ndarray] = {}
        if ops:
            self._run(ops, wanted, totals)
        for t in wanted:
            if t not in totals:  # made by an earlier piece, or a graph input
                totals[t] = np.add.reduce(self.stored[t], axis=0, dtype=np.int64)
        self._forget()
        return totals

    def _needed(self, wanted: list[int]) -> list[int]:
        ops: set[int] = set()
        stack = [t for t in wanted]
        while stack:
            t = stack.pop()
            if t < 0 or t in self.stored or self.constant(t) or t not in self.producer:
                continue
            op = self.producer[t]
            if op in ops or op in self.done:
                continue
            ops.add(op)
            stack += _ints(self.graph.operators[op].inputs)
        return sorted(ops)

    def _run(self, ops: list[int], wanted: list[int], totals: dict[int, np.ndarray] | None) -> None:
        """Run ``ops`` as one piece on every input; with ``totals`` given, the workers add up the integer
        wanted tensors this piece makes into it."""
        chosen = set(ops)
        made = {t for op in ops for t in _ints(self.graph.operators[op].outputs)}
        read = [t for op in ops for t in _ints(self.graph.operators[op].inputs)
                if t >= 0 and t not in made and not self.constant(t)]
        feeds = list(dict.fromkeys(read))
        keep = [t for op in ops for t in _ints(self.graph.operators[op].outputs)
                if t in wanted or self.readers.get(t, set()) - chosen or t in _ints(self.graph.outputs)]
        keep = list(dict.fromkeys(keep))
        piece, index = self._piece(ops, feeds, keep)
        results = {t: self._array((self.count, *self._shape(t)), self._dtype(t)) for t in keep}
        summed = [t for t in keep if totals is not None and t in wanted and np.dtype(self._dtype(t)).kind in "iu"]
        chunk = self._chunk(index, feeds + keep) if self._per_image(ops) else 1
        shares = list(self.pool.map(lambda k: self._share(piece, index, feeds, keep, summed, results, chunk, k),
                                    range(self.workers)))
        if totals is not None:
            for t in summed:
                totals[t] = np.sum([found[t] for found, _ in shares], axis=0)
        self.stored.update(results)
        self.done |= chosen
        self.ops_run += len(ops)
        self.pieces += 1
        self.batched += int(chunk > 1 and all(batched for _, batched in shares))

    def _share(self, piece: bytes, index: dict[int, int], feeds: list[int], keep: list[int], summed: list[int],
               results: dict[int, np.ndarray], chunk: int, k: int) -> tuple[dict[int, np.ndarray], bool]:
        """Worker ``k``'s share of the inputs through the piece, ``chunk`` images per invoke where the piece
        allows it (image by image otherwise): its sums of the ``summed`` tensors, and whether it ran chunks."""
        lo, hi = self.shares[k]
        interpreter = open_interpreter(piece, threads=1)
        sums = {t: np.zeros(self._shape(t), np.int64) for t in summed}
        wide = {t: np.empty(self._shape(t), np.int64 if results[t].itemsize >= 4 else np.int32) for t in summed}
        size, fell_back = 1, chunk == 1
        for start in range(lo, hi, chunk):
            n = min(chunk, hi - start)
            if n != size and not fell_back:
                fell_back = not self._resized(interpreter, index, feeds, keep, n)
                size = 1 if fell_back else n
            for first in range(start, start + n, size):
                part = slice(first, first + size)
                for t in feeds:
                    stored = self.stored[t]
                    interpreter.set_tensor(index[t], stored[first] if size == 1 else
                                           stored[part].reshape(size, *stored.shape[2:]))
                interpreter.invoke()
                for t in keep:
                    view = interpreter.tensor(index[t])()  # read in place; no reference outlives the loop
                    results[t][part] = view.reshape(results[t][part].shape)
                    del view
                for t in summed:  # into buffers made once: a fresh array per image costs its page faults
                    if size == 1:
                        np.add(sums[t], results[t][first], out=sums[t])
                    else:  # int32 is exact for a chunk of up to 2**16 int16 values
                        np.add.reduce(results[t][part], axis=0, dtype=wide[t].dtype, out=wide[t])
                        np.add(sums[t], wide[t], out=sums[t])
        return sums, not fell_back

    def _resized(self, interpreter, index: dict[int, int], feeds: list[int], keep: list[int], n: int) -> bool:
        """Give the piece's inputs a first dimension of ``n``; whether every output then has it (the piece is
        back at its own shapes otherwise)."""
        try:
            for t in feeds:
                interpreter.resize_tensor_input(index[t], [n, *self._shape(t)[1:]], strict=False)
            interpreter.allocate_tensors()
            if all(tuple(interpreter.tensor(index[t])().shape) == (n, *self._shape(t)[1:]) for t in keep):
                return True
        except (ValueError, RuntimeError):
            pass
        for t in feeds:
            interpreter.resize_tensor_input(index[t], list(self._shape(t)), strict=False)
        interpreter.allocate_tensors()
        return False

    def _per_image(self, ops: list[int]) -> bool:
        """Whether every op of the piece computes each image of a batch on its own."""
        for op in ops:
            operator = self.graph.operators[op]
            name = flatbuffers.op_name(self.model, operator)
            if name in _PER_IMAGE_OPS:
                continue
            if name not in _AXIS_OPS or not self._keeps_batch_axis(name, operator):
                return False
        return True

    def _keeps_batch_axis(self, name: str, operator) -> bool:
        first = _ints(operator.inputs)[0]
        rank = len(self._shape(first))
        if name == "CONCATENATION":
            return int(operator.builtinOptions.axis) % max(rank, 1) != 0
        constant = _ints(operator.inputs)[1]
        if not self.constant(constant):
            return False
        buffer = self.model.buffers[int(self.graph.tensors[constant].buffer)]
        values = np.frombuffer(bytes(buffer.data), self._dtype(constant))
        if name in ("PAD", "PADV2"):
            return values.size >= 2 and not values[:2].any()  # no padding of the batch axis
        return bool(rank) and 0 not in {int(a) % rank for a in values}

    def _chunk(self, index: dict[int, int], ends: list[int]) -> int:
        """Images per invoke: as many as keep the piece's activations of one chunk under ``CHUNK_BYTES``; one
        where an input or output has no leading dimension of 1 to stand for the image."""
        if any(self._shape(t)[:1] != (1,) for t in ends):
            return 1
        per_image = sum(int(np.prod(self._shape(t))) * np.dtype(self._dtype(t)).itemsize
                        for t in index if not self.constant(t))
        return max(1, min(max(hi - lo for lo, hi in self.shares), CHUNK_BYTES // max(per_image, 1)))

    def _piece(self, ops: list[int], feeds: list[int], keep: list[int]) -> tuple[bytes, dict[int, int]]:
        """The ops as a model of their own: (its bytes, original tensor index -> the piece's)."""
        used = list(feeds)
        for op in ops:
            used += [t for t in _ints(self.graph.operators[op].inputs) + _ints(self.graph.operators[op].outputs)
                     + _ints(self.graph.operators[op].intermediates) if t >= 0]
        index = {t: i for i, t in enumerate(dict.fromkeys(used))}
        schema = flatbuffers.schema()
        model = schema.ModelT()
        model.version, model.operatorCodes, model.description = self.model.version, self.model.operatorCodes, None
        model.buffers = [schema.BufferT()]
        graph = schema.SubGraphT()
        graph.tensors = []
        for t in index:
            tensor = copy.copy(self.graph.tensors[t])
            if self.constant(t):
                model.buffers.append(self.model.buffers[int(tensor.buffer)])
                tensor.buffer = len(model.buffers) - 1
            else:
                tensor.buffer = 0
            graph.tensors.append(tensor)
        remap = lambda values: [index[t] if t >= 0 else t for t in _ints(values)]  # noqa: E731
        graph.operators = []
        for op in ops:
            piece_op = copy.copy(self.graph.operators[op])
            piece_op.inputs, piece_op.outputs = remap(piece_op.inputs), remap(piece_op.outputs)
            if piece_op.intermediates is not None:
                piece_op.intermediates = remap(piece_op.intermediates)
            graph.operators.append(piece_op)
        graph.inputs, graph.outputs = remap(feeds), remap(keep)
        model.subgraphs = [graph]
        return flatbuffers.write(model), index

    def _array(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An array for a piece's output: one a forgotten tensor left, where one has this shape and type (fresh
        memory costs a page fault per page written, as much as a small piece's run)."""
        spare = self.spare.get((shape, np.dtype(dtype)))
        return spare.pop() if spare else np.empty(shape, dtype)

    def _forget(self, handed_out: frozenset[int] = frozenset()) -> None:
        """Drop stored tensors that no op still to run reads (graph inputs and outputs stay); their arrays are
        kept for later pieces' outputs."""
        ends = set(_ints(self.graph.inputs)) | set(_ints(self.graph.outputs))
        for t in list(self.stored):
            if t not in ends and self.readers.get(t, set()) <= self.done:
                array = self.stored.pop(t)
                if t not in handed_out:  # the caller holds those
                    self.spare.setdefault((array.shape, array.dtype), []).append(array)

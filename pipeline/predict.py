"""Model runners for validation: one interface over LiteRT, Keras and SavedModel.

Validation compares two models on the same decoded pixels: each runner
turns them into its own model's input through the one preprocessing
definition (``input_convention``: [-1, 1] or the pixels themselves) and
applies its model's input/output quantization (scale and zero point read
from the model).
Interpreters are built once per runner, never per sample: LiteRT releases the
GIL in ``invoke``, so a thread pool with one batch-1 interpreter per thread
keeps every core busy without pickling anything between processes.
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import artifacts
from pipeline.errors import ModelLoadError, ValidationError
from pipeline.preprocessing import LEGACY_CONVENTION, dequantize, model_input, quantize, recorded_convention
from pipeline.tflite_info import stated_convention


def open_interpreter(model_bytes: bytes, *, preserve_all_tensors: bool = False, threads: int = 1,
                     name: str = "this model"):
    """The one place where .tflite bytes become an interpreter.

    Loading untrusted flatbuffers will move to a child process (a later issue);
    everything here goes through this function so that swap is one edit.
    ``preserve_all_tensors`` turns off the default XNNPACK delegate, whose
    internal tensors are not kept.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from pipeline.quiet import native_stderr_captured

    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if preserve_all_tensors else OpResolverType.AUTO
    with native_stderr_captured() as log:  # "INFO: Created TensorFlow Lite XNNPACK delegate", or the real error
        try:
            interpreter = Interpreter(model_content=model_bytes, num_threads=threads,
                                      experimental_op_resolver_type=resolver,
                                      experimental_preserve_all_tensors=preserve_all_tensors)
            interpreter.allocate_tensors()
            return interpreter
        except (ValueError, RuntimeError) as exc:
            error = exc
        if "XNNPACK" in str(error) and resolver == OpResolverType.AUTO:
            # XNNPACK refuses the graph (extreme requantization scales): the builtin kernels compute
            # the same numbers, slower; `convert` warns about such models when it writes them.
            builtin = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            try:
                interpreter = Interpreter(model_content=model_bytes, num_threads=threads,
                                          experimental_op_resolver_type=builtin)
                interpreter.allocate_tensors()
                return interpreter
            except (ValueError, RuntimeError) as exc:
                error = exc
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    detail = log.tail(3)
    raise ModelLoadError(f"LiteRT cannot load {name}: {first}" + (f"\n{detail}" if detail else ""))


def input_convention(model_bytes: bytes, manifest: dict | None) -> tuple[str, str]:
    """(input convention, where it was read) of a .tflite: its input quantization where that states one
    (integer inputs always do), else its manifest; a float model with neither is one from before input
    conventions existed, so [-1, 1]."""
    stated = stated_convention(model_bytes)
    recorded = (manifest or {}).get("preprocessing") or {}
    if stated is not None:
        if "input_convention" in recorded and recorded_convention(recorded) != stated:
            raise ModelLoadError(f"the manifest records {recorded['input_convention']} input but the model's input "
                                 f"is quantized as {stated}")
        return stated, "input tensor quantization"
    if manifest is not None:
        return recorded_convention(recorded), "manifest" if "input_convention" in recorded else \
            "manifest from before input conventions"
    return LEGACY_CONVENTION, "assumed: a float input, and no manifest says otherwise"


def manifest_beside(path: Path) -> dict | None:
    manifest = artifacts.manifest_path_for(path)
    if not manifest.is_file():
        return None
    try:
        return artifacts.read_manifest(manifest)
    except artifacts.ArtifactError:
        return None  # validate reports the unreadable manifest; the input tensor still decides


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


@dataclass
class ModelFacts:
    """What a report says about a model: enough to tell two artifacts apart."""

    path: str
    kind: str
    sha256: str
    bytes: int
    input_size: int
    classes: int
    input_dtype: str
    output_dtype: str
    input_convention: str = LEGACY_CONVENTION
    input_convention_from: str = "Keras model (trained on p / 127.5 - 1)"

    def to_dict(self) -> dict:
        return dict(vars(self))


class TfliteRunner:
    """A pool of batch-1 LiteRT interpreters (XNNPACK), one per worker thread."""

    def __init__(self, path: str | os.PathLike, *, workers: int | None = None):
        from pipeline.safe_tflite import load_untrusted

        path = Path(path)
        # Untrusted files get their first load and invoke in a limited child: a corrupt
        # flatbuffer then ends in "invalid model: ...", never a crash of this process.
        self.model_bytes = load_untrusted(path)
        self.workers = workers or default_workers()
        first = open_interpreter(self.model_bytes, name=str(path))
        ins, outs = first.get_input_details(), first.get_output_details()
        if len(ins) != 1 or len(outs) != 1:
            raise ModelLoadError(f"{path}: expected one input and one output, got {len(ins)} and {len(outs)}")
        shape = [int(s) for s in ins[0]["shape"]]
        if len(shape) != 4 or shape[0] != 1 or shape[3] != 3 or shape[1] != shape[2]:
            raise ModelLoadError(f"{path}: expected a (1, H, H, 3) image input, got {shape}")
        out_shape = [int(s) for s in outs[0]["shape"]]
        if len(out_shape) != 2:
            raise ModelLoadError(f"{path}: expected a (1, classes) output, got {out_shape}")
        self._in, self._out = ins[0], outs[0]
        self.convention, how = input_convention(self.model_bytes, manifest_beside(path))
        self.facts = ModelFacts(str(path), "tflite", artifacts.sha256_bytes(self.model_bytes), len(self.model_bytes),
                                shape[1], out_shape[1], np.dtype(ins[0]["dtype"]).name,
                                np.dtype(outs[0]["dtype"]).name, self.convention, how)
        self._pool: queue.SimpleQueue = queue.SimpleQueue()
        self._pool.put(first)
        for _ in range(self.workers - 1):
            self._pool.put(open_interpreter(self.model_bytes))
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="litert")

    def _one(self, x: np.ndarray) -> np.ndarray:
        interpreter = self._pool.get()
        try:
            scale_, zero = self._in["quantization"]
            interpreter.set_tensor(self._in["index"], quantize(x[None], self._in["dtype"], scale_, zero))
            interpreter.invoke()
            raw = interpreter.get_tensor(self._out["index"])[0]
        finally:
            self._pool.put(interpreter)
        scale_, zero = self._out["quantization"]
        return dequantize(raw, scale_, zero)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Outputs for inputs already in this model's convention (float values; quantized here)."""
        return np.stack(list(self._executor.map(self._one, batch))).astype(np.float32)

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Outputs for decoded uint8 pixels, fed as this model's input convention says."""
        return self.predict(model_input(pixels, self.convention))

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class KerasRunner:
    """A Keras 3, tf_keras or SavedModel float model, run in batches."""

    batch_size = 16  # Xception-299 activations at batch 64 would need gigabytes
    convention = LEGACY_CONVENTION  # what the Keras model is trained on

    def __init__(self, path: str | os.PathLike, *, trust_code: bool = False):
        from pipeline.modelio import load_source

        path = Path(path)
        self.source = load_source(path, trust_code=trust_code)
        self._fn = None
        self._fixed_batch = False
        if self.source.model is None:
            import tensorflow as tf

            signature = tf.saved_model.load(str(path)).signatures["serving_default"]
            self._input_name = next(iter(signature.structured_input_signature[1]))
            self._fixed_batch = signature.structured_input_signature[1][self._input_name].shape[0] == 1
            self._fn = signature
        self.facts = ModelFacts(str(path), self.source.kind, artifacts.sha256_any(path), artifacts.size_any(path),
                                self.source.input_size, self.source.classes, "float32", "float32")

    def _call(self, x: np.ndarray) -> np.ndarray:
        if self._fn is None:
            return np.asarray(self.source.model(x, training=False), dtype=np.float32)
        import tensorflow as tf

        out = self._fn(**{self._input_name: tf.constant(x)})
        return np.asarray(next(iter(out.values())), dtype=np.float32)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if self._fixed_batch:
            return np.concatenate([self._call(x[None]) for x in batch])
        batch = np.asarray(batch, dtype=np.float32)
        return np.concatenate([self._call(batch[i:i + self.batch_size]) for i in range(0, len(batch), self.batch_size)])

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self.predict(model_input(pixels, self.convention))

    def close(self) -> None:
        pass


def open_runner(path: str | os.PathLike, *, workers: int | None = None, trust_code: bool = False):
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model not found: {path}")
    if path.suffix.lower() == ".tflite":
        return TfliteRunner(path, workers=workers)
    return KerasRunner(path, trust_code=trust_code)


def as_probabilities(outputs: np.ndarray, what: str) -> tuple[np.ndarray, str]:
    """Rows that already are probabilities are renormalised; anything else is treated as logits.

    A quantized softmax (scale 1/256) sums to 1 only within a few hundredths,
    hence the tolerance. NaN or infinite outputs are an error, never a pass.
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    bad = ~np.isfinite(outputs).all(axis=1)
    if bad.any():
        raise ValidationError(f"the {what} model produced NaN or infinite outputs for {int(bad.sum())} of "
                              f"{len(outputs)} images (first: image #{int(np.argmax(bad))}); its numbers "
                              "cannot be trusted")
    sums = outputs.sum(axis=1)
    if outputs.min() >= -1e-6 and np.all(np.abs(sums - 1.0) < 0.05):
        return outputs / np.maximum(sums[:, None], 1e-12), "probabilities"
    shifted = outputs - outputs.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True), "logits (softmax applied)"

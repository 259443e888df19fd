"""Model runners for validation: one interface over LiteRT, Keras and SavedModel.

Validation compares two models on the same decoded pixels: each runner
turns them into its own model's input through the one preprocessing
definition (``predict_pixels``: the model's input convention, read from the
model by ``pipeline.tflite.input_convention``) and applies its model's
input/output quantization (scale and zero point read from the model).
Interpreters are built once per runner, never per sample: LiteRT releases the
GIL in ``invoke``, so a thread pool with one batch-1 interpreter per thread
keeps every core busy without pickling anything between processes.
"""

from __future__ import annotations

import os
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import artifacts
from pipeline.core.errors import ModelLoadError, ValidationError
from pipeline.core.preprocessing import LEGACY_CONVENTION, dequantize, model_input, model_tensor
from pipeline.model.keras_output import OutputKind, keras_output_kind
from pipeline.model.modelio import load_source
from pipeline.model.stem import input_domain
from pipeline.tflite.input_convention import file_convention
from pipeline.tflite.runtime import invoke_one, open_interpreter
from pipeline.tflite.sandboxed_load import load_untrusted
from pipeline.validation.output_kind import saved_model_output_kind, tflite_output_kind


def default_workers() -> int:
    """The cores this process may run on (its affinity, where the OS says it; else all of them)."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return max(1, len(usable) if usable else os.cpu_count() or 1)


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

    def __init__(self, path: str | os.PathLike, *, workers: int | None = None,
                 converted: tuple[bytes, tuple[str, str]] | None = None):
        """``converted``: (bytes this process converted, their (input convention, where it was read from));
        ``path`` then only names them."""
        if converted is None:
            # Untrusted files get their first load and invoke in a limited child: a corrupt
            # flatbuffer then ends in "invalid model: ...", never a crash of this process.
            model_bytes = load_untrusted(Path(path))
            converted = model_bytes, file_convention(Path(path), model_bytes)
        self._setup(converted[0], str(path), converted[1], workers)

    def _setup(self, model_bytes: bytes, name: str, convention: tuple[str, str], workers: int | None) -> None:
        self.model_bytes = model_bytes
        self.workers = workers or default_workers()
        first = open_interpreter(self.model_bytes, name=name)
        ins, outs = first.get_input_details(), first.get_output_details()
        if len(ins) != 1 or len(outs) != 1:
            raise ModelLoadError(f"{name}: expected one input and one output, got {len(ins)} and {len(outs)}")
        shape = [int(s) for s in ins[0]["shape"]]
        if len(shape) != 4 or shape[0] != 1 or shape[3] != 3 or shape[1] != shape[2]:
            raise ModelLoadError(f"{name}: expected a (1, H, H, 3) image input, got {shape}")
        out_shape = [int(s) for s in outs[0]["shape"]]
        if len(out_shape) != 2:
            raise ModelLoadError(f"{name}: expected a (1, classes) output, got {out_shape}")
        self._in, self._out = ins[0], outs[0]
        # Decoding and quantizing are elementwise, so the input tensor of every pixel value, computed once through
        # the one definition, gives an image's input by indexing: the same numbers at a fraction of the cost.
        self._tensor_of_pixel: np.ndarray | None
        try:
            self._tensor_of_pixel = model_tensor(np.arange(256, dtype=np.uint8), convention[0], ins[0]["dtype"],
                                                 *ins[0]["quantization"])
        except ValueError:  # no input scale: ``_one`` says so when the model is run
            self._tensor_of_pixel = None
        self.output_kind = tflite_output_kind(self.model_bytes)
        self.convention, how = convention
        self.facts = ModelFacts(name, "tflite", artifacts.sha256_bytes(self.model_bytes), len(self.model_bytes),
                                shape[1], out_shape[1], np.dtype(ins[0]["dtype"]).name,
                                np.dtype(outs[0]["dtype"]).name, self.convention, how)
        self._pool: queue.SimpleQueue = queue.SimpleQueue()
        self._pool.put(first)
        for _ in range(self.workers - 1):
            self._pool.put(open_interpreter(self.model_bytes))
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="litert")

    per_image = True  # ``predict_one`` runs on one of this runner's interpreters, from any thread

    def _one(self, x: np.ndarray) -> np.ndarray:
        interpreter = self._pool.get()
        try:
            raw = invoke_one(interpreter, x)[0]
        finally:
            self._pool.put(interpreter)
        scale_, zero = self._out["quantization"]
        return dequantize(raw, scale_, zero)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Outputs for inputs already in this model's convention (float values; quantized here)."""
        return np.stack(list(self._executor.map(self._one, batch))).astype(np.float32)

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Outputs for decoded uint8 pixels, fed as this model's input convention says (what a device feeds)."""
        return self.predict(model_input(pixels, self.convention))

    def predict_one(self, pixels: np.ndarray) -> np.ndarray:
        """The output for one image's decoded uint8 pixels (HxWx3): ``predict_pixels`` of a batch of one, row 0."""
        if pixels.dtype != np.uint8 or self._tensor_of_pixel is None:
            return self._one(model_input(pixels, self.convention)).astype(np.float32)
        interpreter = self._pool.get()
        try:
            interpreter.set_tensor(self._in["index"], self._tensor_of_pixel[pixels][None])
            interpreter.invoke()
            raw = interpreter.get_tensor(self._out["index"])[0]
        finally:
            self._pool.put(interpreter)
        return dequantize(raw, *self._out["quantization"])

    def seconds_per_image(self, pixels: np.ndarray) -> float:
        """One interpreter's time per image on these pixels, one thread, nothing else of this runner running."""
        inputs = model_input(pixels, self.convention)
        interpreter = self._pool.get()
        try:
            t0 = time.perf_counter()
            for x in inputs:
                invoke_one(interpreter, x)
            return (time.perf_counter() - t0) / max(len(inputs), 1)
        finally:
            self._pool.put(interpreter)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class KerasRunner:
    """A Keras 3, tf_keras or SavedModel float model, run in batches."""

    batch_size = 16  # Xception-299 activations at batch 64 would need gigabytes
    per_image = False  # one batched call spreads over every core: run on whole chunks, not image by image
    convention = LEGACY_CONVENTION  # what the Keras model is trained on, unless its own layers normalize pixels

    def __init__(self, path: str | os.PathLike, *, trust_code: bool = False):
        path = Path(path)
        self.source = load_source(path, trust_code=trust_code)
        self.convention = input_domain(self.source.model)  # pixels when the model starts with its normalization
        self._fn = None
        self._fixed_batch = False
        if self.source.model is None:
            import tensorflow as tf

            signature = tf.saved_model.load(str(path)).signatures["serving_default"]
            self._input_name = next(iter(signature.structured_input_signature[1]))
            self._fixed_batch = signature.structured_input_signature[1][self._input_name].shape[0] == 1
            self._fn = signature
        self.output_kind = (keras_output_kind(self.source.model) if self._fn is None
                            else saved_model_output_kind(self._fn))
        self.facts = ModelFacts(str(path), self.source.kind, artifacts.sha256_any(path), artifacts.size_any(path),
                                self.source.input_size, self.source.classes, "float32", "float32",
                                self.convention, ("Keras model (its own normalization layers take pixels)"
                                                  if self.convention == "pixels" else ModelFacts.input_convention_from))

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

    def seconds_per_image(self, pixels: np.ndarray) -> float:
        """Time per image of one batched call (TensorFlow spreads it over every core: not one thread)."""
        t0 = time.perf_counter()
        self.predict_pixels(pixels)
        return (time.perf_counter() - t0) / max(len(pixels), 1)

    def close(self) -> None:
        pass


def open_runner(path: str | os.PathLike, *, workers: int | None = None, trust_code: bool = False):
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model not found: {path}")
    if path.suffix.lower() == ".tflite":
        return TfliteRunner(path, workers=workers)
    return KerasRunner(path, trust_code=trust_code)


def as_probabilities(outputs: np.ndarray, kind: OutputKind, what: str) -> np.ndarray:
    """Probabilities as the model gives them (dequantized, not renormalised), or softmax of its logits.

    NaN or infinite outputs are an error, never a pass.
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    bad = ~np.isfinite(outputs).all(axis=1)
    if bad.any():
        raise ValidationError(f"the {what} model produced NaN or infinite outputs for {int(bad.sum())} of "
                              f"{len(outputs)} images (first: image #{int(np.argmax(bad))}); its numbers "
                              "cannot be trusted")
    if kind.probabilities:
        return outputs
    shifted = outputs - outputs.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)

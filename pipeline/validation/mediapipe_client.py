"""MediaPipe Tasks' ``ImageClassifier`` as a parity target: the client Android, iOS, web and Python apps use.

It is given the same model-size RGB pixels as every other runtime, as an
``mp.Image`` (SRGB), and asked for every class's score (``max_results=-1``,
no allow- or denylist); it normalizes a float input itself from the model's
NormalizationOptions metadata. Where an eval file is already RGB at the
model's input size, MediaPipe also decodes it itself, and the outputs'
changes from that are reported as decoder differences, apart from the
runtime's (its decoder is not Pillow's, notably for JPEG). It refuses some models (today: an int8
input, which it does not take); that becomes one ``ValidationError`` line
that names the reason and the fix, never a traceback.

MediaPipe's native metadata parser trusts the model it reads, so a crafted
``.tflite`` can crash the process that opens it. Two guards: the metadata is
checked against its schema in Python first (``metadata.read_metadata``:
buffer indices, offsets, UTF-8), and MediaPipe itself runs in a child process
of its own (``multiprocessing`` spawn, no core dumps) that receives the
pixels and sends back scores; a crash there is one ``ValidationError``, never
the caller's crash. ``mediapipe`` is imported only in that child.
"""

from __future__ import annotations

import multiprocessing
from importlib import metadata
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

from pipeline.core.errors import Remedy, ValidationError
from pipeline.core.preprocessing import dequantize
from pipeline.core.tf_logs import import_tensorflow_quietly, native_stderr_captured
from pipeline.tflite.sandboxed_load import read_model_bytes
from pipeline.tflite.metadata import read_metadata
from pipeline.validation.parity import Outputs, Step
from pipeline.validation.parity_images import Feed, ModelIO

INSTALL_HINT = "pip install mediapipe (or the project's dev extra)"


def refusal(model: Path, error: str) -> ValidationError:
    """MediaPipe's own reason, on one line, with what to change for the refusals known today."""
    reason = " ".join(error.split())
    if "got INT8" in reason:
        return ValidationError(f"MediaPipe's ImageClassifier refuses {model}: {reason.rstrip('.')}; it takes uint8 "
                               "or float32 image inputs and this model's input is int8", remedy=Remedy.INT8_PIXELS)
    if "NormalizationOptions" in reason:
        return ValidationError(f"MediaPipe's ImageClassifier refuses {model}: {reason.rstrip('.')}; its float32 "
                               "input needs NormalizationOptions metadata: convert the model again with this version")
    return ValidationError(f"MediaPipe's ImageClassifier refuses {model}: {reason}")


def _mediapipe_version() -> str:
    try:
        return metadata.version("mediapipe")
    except metadata.PackageNotFoundError:
        return "?"


def _row(result, classes: int) -> np.ndarray:
    row = np.full(classes, np.nan, dtype=np.float32)  # a class MediaPipe leaves out stays NaN: an error
    for category in result.classifications[0].categories:
        if 0 <= category.index < classes:
            row[category.index] = category.score
    return row


def _serve(conn, model: str, classes: int) -> None:
    """The child: MediaPipe opens the model, then classifies what the parent sends. Messages back: ("missing" |
    "refused", reason), ("ready", None), ("step", n), ("done", (rows, own rows))."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash here is expected from crafted files: no core
    try:
        import_tensorflow_quietly()  # mediapipe imports TensorFlow, whose start-up log is not the user's
        with native_stderr_captured():
            import mediapipe as mp
            from mediapipe.tasks.python import vision
            from mediapipe.tasks.python.core.base_options import BaseOptions
    except ImportError as exc:
        conn.send(("missing", str(exc)))
        return
    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=model), max_results=-1)
    with native_stderr_captured():  # MediaPipe's native start-up and per-image log
        try:
            classifier = vision.ImageClassifier.create_from_options(options)
        except (ValueError, RuntimeError) as exc:
            conn.send(("refused", str(exc)))
            return
        conn.send(("ready", None))
        try:
            pixels, paths = conn.recv()
            rows = []
            for i, image in enumerate(pixels):
                frame = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image))
                rows.append(_row(classifier.classify(frame), classes))
                conn.send(("step", i + 1))
            own = [_own_row(mp, classifier, path, pixels.shape[1], classes) for path in paths]
            conn.send(("done", (np.stack(rows) if rows else np.zeros((0, classes), np.float32), own)))
        finally:
            classifier.close()


def _own_row(mp, classifier, path: str, size: int, classes: int) -> np.ndarray | None:
    """MediaPipe's scores for the file as it decodes it, when it is already RGB at the model's size; else None
    (it would also resize it, or refuse a one-channel image: not a decoder difference)."""
    try:
        image = mp.Image.create_from_file(str(path))
    except (RuntimeError, ValueError):
        return None
    if image.image_format != mp.ImageFormat.SRGB or (image.height, image.width) != (size, size):
        return None
    return _row(classifier.classify(image), classes)


def _how(exitcode: int | None) -> str:
    return f"signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"


class MediapipeTarget:
    """One ``ImageClassifier`` (image mode) on the model file, opened in its child when the target is made."""

    name = "mediapipe"

    def __init__(self, model: str | Path, io: ModelIO):
        self.model, self.classes = Path(model), io.classes
        self._scale = io.output.scale if io.output.quantized else 0.0
        self._zero = io.output.zero_point
        read_metadata(read_model_bytes(self.model))  # malformed metadata never reaches MediaPipe's parser
        context = multiprocessing.get_context("spawn")  # no fork of this process's threads and TensorFlow state
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_serve, args=(child_conn, str(self.model), self.classes),
                                        name="xedge-mediapipe", daemon=True)
        self._process.start()
        child_conn.close()
        kind, value = self._receive()
        if kind == "missing":
            self.close()
            raise ValidationError(f"the MediaPipe target needs the mediapipe package ({INSTALL_HINT}): {value}",
                                  setting="mediapipe")
        if kind == "refused":
            self.close()
            raise refusal(self.model, value)

    def _receive(self):
        """The child's next message; a child that died instead is a ``ValidationError`` naming how."""
        while True:
            ready = wait([self._conn, self._process.sentinel])
            if self._conn in ready:
                try:
                    return self._conn.recv()
                except EOFError:
                    pass
            if self._process.sentinel in ready or not self._process.is_alive():
                self._process.join()
                code = self._process.exitcode
                self.close()
                raise ValidationError(f"MediaPipe's ImageClassifier crashed on {self.model} ({_how(code)}); it ran "
                                      "in a process of its own, nothing else was affected")

    def run(self, feed: Feed, step: Step | None = None) -> Outputs:
        try:
            self._conn.send((np.ascontiguousarray(feed.pixels), [str(p) for p in feed.paths or ()]))
            while True:
                kind, value = self._receive()
                if kind == "done":
                    break
                if step:
                    step(value)
        finally:
            self.close()
        rows, own = value
        scores, raw = self._dequantized(rows)
        return Outputs(scores, raw, f"mediapipe {_mediapipe_version()} ImageClassifier",
                       "this machine, in a child process",
                       f"mp.Image SRGB of the same uint8 pixels ({feed.pixels.shape[1]}x{feed.pixels.shape[2]}); "
                       "MediaPipe normalizes them from the model's metadata", self._decoding(feed, scores, own))

    def _dequantized(self, scores: np.ndarray):
        """MediaPipe's scores of a quantized output are dequantized already: give back its integers too."""
        if not self._scale:
            return scores, None
        raw = np.rint(scores / np.float32(self._scale) + self._zero).astype(np.int64)
        return dequantize(raw, self._scale, self._zero), raw

    def _decoding(self, feed: Feed, same_pixels: np.ndarray, own: list) -> dict | None:
        """Decoder differences, apart from runtime ones: MediaPipe decoding each file itself against MediaPipe
        given Pillow's pixels of it. Only files already RGB at the model's input size can be compared."""
        if not feed.paths:
            return None
        changed, diffs = [], []
        for path, ref, own_row in zip(feed.paths, same_pixels, own):
            if own_row is None:
                continue
            row, _ = self._dequantized(own_row[None])
            diff = np.abs(row[0].astype(np.float64) - ref.astype(np.float64)).max()
            diffs.append(diff / self._scale if self._scale else diff)
            if int(row[0].argmax()) != int(ref.argmax()):
                changed.append(path)
        unit = "quanta" if self._scale else "absolute units"
        return {"what": "MediaPipe decoding each file itself (mp.Image.create_from_file) against MediaPipe given "
                        "the pixels xedge decoded: decoder differences, reported apart and not gated",
                "compared": len(diffs), "not_compared": len(feed.paths) - len(diffs),
                "not_compared_why": "not RGB at the model's input size (MediaPipe would resize or refuse them)",
                "top1_changed": changed, "identical_outputs": int(sum(d == 0 for d in diffs)),
                "max_diff": round(float(max(diffs)), 6) if diffs else None, "unit": unit}

    def close(self) -> None:
        """End the child (this target's own process, by its handle) and close the pipe."""
        process = getattr(self, "_process", None)
        if process is not None and process.is_alive():
            process.kill()
            process.join()
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()

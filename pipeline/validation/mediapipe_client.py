"""MediaPipe Tasks' ``ImageClassifier`` as a parity target: the client Android, iOS, web and Python apps use.

It is given the same model-size RGB pixels as every other runtime, as an
``mp.Image`` (SRGB), and asked for every class's score (``max_results=-1``,
no allow- or denylist); it normalizes a float input itself from the model's
NormalizationOptions metadata. Where an eval file is already RGB at the
model's input size, MediaPipe also decodes it itself, and the outputs'
changes from that are reported as decoder differences, apart from the
runtime's (its decoder is not Pillow's, notably for JPEG). It refuses some models (today: an int8
input, which it does not take); that becomes one ``ValidationError`` line
that names the reason and the fix, never a traceback. ``mediapipe`` is
imported only here, when the target is built.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np

from pipeline.core.errors import ValidationError
from pipeline.core.preprocessing import dequantize
from pipeline.core.quiet import import_tensorflow_quietly, native_stderr_captured
from pipeline.validation.parity import Outputs, Step
from pipeline.validation.parity_images import Feed, ModelIO

INSTALL_HINT = "pip install mediapipe (or the project's dev extra)"


def refusal_message(model: Path, error: str) -> str:
    """MediaPipe's own reason, on one line, with the fix for the refusals known today."""
    reason = " ".join(error.split())
    if "got INT8" in reason:
        fix = ("it takes uint8 or float32 image inputs and this model's input is int8: convert it with plain "
               "--int8 (uint8 pixel input, the default) or --float-io")
    elif "NormalizationOptions" in reason:
        fix = "its float32 input needs NormalizationOptions metadata: convert the model again with this version"
    else:
        return f"MediaPipe's ImageClassifier refuses {model}: {reason}"
    return f"MediaPipe's ImageClassifier refuses {model}: {reason.rstrip('.')}; {fix}"


def _mediapipe_version() -> str:
    try:
        return metadata.version("mediapipe")
    except metadata.PackageNotFoundError:
        return "?"


class MediapipeTarget:
    """One ``ImageClassifier`` (image mode) on the model file, built when the target is made."""

    name = "mediapipe"

    def __init__(self, model: str | Path, io: ModelIO):
        self.model, self.classes = Path(model), io.classes
        self._scale = io.output.scale if io.output.quantized else 0.0
        self._zero = io.output.zero_point
        try:
            import_tensorflow_quietly()  # mediapipe imports TensorFlow, whose start-up log is not the user's
            with native_stderr_captured():
                import mediapipe as mp
                from mediapipe.tasks.python import vision
                from mediapipe.tasks.python.core.base_options import BaseOptions
        except ImportError as exc:
            raise ValidationError(f"--mediapipe needs the mediapipe package ({INSTALL_HINT}): {exc}") from None
        self._mp = mp
        options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(self.model)),
                                                max_results=-1)
        with native_stderr_captured():  # MediaPipe's native start-up log
            try:
                self._classifier = vision.ImageClassifier.create_from_options(options)
            except (ValueError, RuntimeError) as exc:
                raise ValidationError(refusal_message(self.model, str(exc))) from None

    def _scores(self, pixels: np.ndarray, classes: int) -> np.ndarray:
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(pixels))
        return self._row(self._classifier.classify(image), classes)

    @staticmethod
    def _row(result, classes: int) -> np.ndarray:
        row = np.full(classes, np.nan, dtype=np.float32)  # a class MediaPipe leaves out stays NaN: an error
        for category in result.classifications[0].categories:
            if 0 <= category.index < classes:
                row[category.index] = category.score
        return row

    def run(self, feed: Feed, step: Step | None = None) -> Outputs:
        rows = []
        try:
            with native_stderr_captured():
                for i, pixels in enumerate(feed.pixels):
                    rows.append(self._scores(pixels, self.classes))
                    if step:
                        step(i + 1)
                scores, raw = self._dequantized(np.stack(rows))
                decoding = self._decoding(feed, scores)
        finally:
            self.close()
        return Outputs(scores, raw, f"mediapipe {_mediapipe_version()} ImageClassifier", "this machine, in process",
                       f"mp.Image SRGB of the same uint8 pixels ({feed.pixels.shape[1]}x{feed.pixels.shape[2]}); "
                       "MediaPipe normalizes them from the model's metadata", decoding)

    def _dequantized(self, scores: np.ndarray):
        """MediaPipe's scores of a quantized output are dequantized already: give back its integers too."""
        if not self._scale:
            return scores, None
        raw = np.rint(scores / np.float32(self._scale) + self._zero).astype(np.int64)
        return dequantize(raw, self._scale, self._zero), raw

    def _own_decode(self, path: str, size: int):
        """The file as MediaPipe decodes it, when it is already RGB at the model's size; else None (it would
        also resize it, or refuse a one-channel image: not a decoder difference)."""
        try:
            image = self._mp.Image.create_from_file(str(path))
        except (RuntimeError, ValueError):
            return None
        if image.image_format != self._mp.ImageFormat.SRGB or (image.height, image.width) != (size, size):
            return None
        return image

    def _decoding(self, feed: Feed, same_pixels: np.ndarray) -> dict | None:
        """Decoder differences, apart from runtime ones: MediaPipe decoding each file itself against MediaPipe
        given Pillow's pixels of it. Only files already RGB at the model's input size can be compared."""
        if not feed.paths:
            return None
        size, changed, diffs = feed.pixels.shape[1], [], []
        for path, ref in zip(feed.paths, same_pixels):
            image = self._own_decode(path, size)
            if image is None:
                continue
            row, _ = self._dequantized(self._row(self._classifier.classify(image), self.classes)[None])
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
        classifier, self._classifier = getattr(self, "_classifier", None), None
        if classifier is not None:
            classifier.close()

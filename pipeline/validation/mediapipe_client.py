"""MediaPipe Tasks' ``ImageClassifier`` as a parity target: the client Android, iOS, web and Python apps use.

It is given the same model-size RGB pixels as every other runtime, as an
``mp.Image`` (SRGB), and asked for every class's score (``max_results=-1``,
no allow- or denylist); it normalizes a float input itself from the model's
NormalizationOptions metadata. It refuses some models (today: an int8
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
        fix = ("it takes uint8 or float32 image inputs and this model's input is int8: convert it with --float-io "
               "for float32 input and output")
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
        result = self._classifier.classify(image)
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
        finally:
            self.close()
        scores = np.stack(rows)
        raw = None
        if self._scale:  # a quantized output: MediaPipe's scores are dequantized; give back its integers too
            raw = np.rint(scores / np.float32(self._scale) + self._zero).astype(np.int64)
            scores = dequantize(raw, self._scale, self._zero)
        return Outputs(scores, raw, f"mediapipe {_mediapipe_version()} ImageClassifier", "this machine, in process",
                       f"mp.Image SRGB of the same uint8 pixels ({feed.pixels.shape[1]}x{feed.pixels.shape[2]}); "
                       "MediaPipe normalizes them from the model's metadata")

    def close(self) -> None:
        classifier, self._classifier = getattr(self, "_classifier", None), None
        if classifier is not None:
            classifier.close()

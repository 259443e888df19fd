"""Training input: labeled image folders to tf.data pipelines, through the one preprocessing.

Every image goes through ``preprocessing.pixels_for`` (Pillow decode, EXIF,
mode rules, centre crop, resize), never through ``tf.image.decode_*``, whose
colour and resize rules differ and would make training drift from what
calibration and the device see. Decoding is parallel (a thread pool, or
``num_parallel_calls`` when streaming); the decoded uint8 pixels are kept in
memory when they fit, otherwise decoded again each epoch.

The order of every epoch is a pure function of (seed, epoch), and the
augmentation of every example a pure function of (seed, epoch, position), so
a run resumed at step k of epoch e sees exactly the batches the killed run
would have seen.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pipeline.core.data import Skip, discover
from pipeline.core.errors import DataError
from pipeline.core.preprocessing import ImageError, PreprocessSpec, pixels_for, scale_tf

CACHE_BUDGET_BYTES = int(os.environ.get("XEDGE_CACHE_BYTES", 8 * 2**30))


@dataclass
class LabeledFolder:
    paths: list[str]
    labels: np.ndarray  # int64 class index per path
    classes: list[str]
    skipped: list[Skip] = field(default_factory=list)


@dataclass
class Images:
    """Decoded uint8 pixels (``pixels``) or, when they do not fit, the paths to decode per epoch."""

    labels: np.ndarray
    spec: PreprocessSpec
    pixels: np.ndarray | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "Images":
        return Images(self.labels[index], self.spec,
                      None if self.pixels is None else self.pixels[index],
                      None if self.paths is None else [self.paths[i] for i in index])


def list_labeled(folder, classes: list[str] | None = None) -> LabeledFolder:
    found = discover(folder, what="training folder")
    if found.classes is None:
        raise DataError(f"{folder} must hold one subfolder per class (found only loose files)")
    classes = list(classes or found.classes)
    unknown = sorted({i.class_name for i in found.items} - set(classes))
    if unknown:
        raise DataError(f"{folder}: class folders {', '.join(map(repr, unknown[:5]))} are not among the "
                        f"training classes ({', '.join(classes[:10])})")
    if len(classes) < 2:
        raise DataError(f"{folder} holds one class ({classes[0]!r}); a classifier needs at least two")
    index = {c: i for i, c in enumerate(classes)}
    return LabeledFolder([str(i.path) for i in found.items],
                         np.asarray([index[i.class_name] for i in found.items], dtype=np.int64), classes,
                         list(found.skipped))


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class hold-out: (train indices, validation indices), each sorted."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue  # a class with one image trains; it cannot also be validated
        n = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        val.append(rng.permutation(members)[:n])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


CONTENT_DIGEST_LIMIT = 2 * 2**30


def digest(paths: list[str], root) -> tuple[str, str]:
    """One hash over relative paths and contents, so a resumed run provably sees the same data.

    Above 2 GiB of files, reading everything twice (hash, then decode) would
    dominate start-up, so sizes and modification times stand in for contents.
    Returns (hex digest, method).
    """
    root = os.path.abspath(root)
    stats = {p: os.stat(p) for p in paths}
    by_content = sum(st.st_size for st in stats.values()) <= CONTENT_DIGEST_LIMIT
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(os.path.relpath(os.path.abspath(p), root).encode() + b"\0")
        if by_content:
            with open(p, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        else:
            h.update(f"{stats[p].st_size}:{stats[p].st_mtime_ns}".encode())
    return h.hexdigest(), "sha256 of paths and contents" if by_content else "sha256 of paths, sizes and mtimes"


def load_images(folder: LabeledFolder, spec: PreprocessSpec, *, workers: int | None = None,
                budget: int = CACHE_BUDGET_BYTES) -> Images:
    """Decode in parallel into memory when the pixels fit ``budget``; otherwise keep paths to stream.

    Streaming skips nothing at run time (a bad file there stops training with its
    name), so the in-memory path, which lists unreadable files as skips, is the default
    for every dataset that fits.
    """
    n = len(folder.paths)
    if n * spec.size * spec.size * 3 > budget:
        return Images(folder.labels, spec, paths=list(folder.paths))
    workers = workers or min(32, (os.cpu_count() or 2) * 2)

    def one(path):
        try:
            return pixels_for(path, spec), None
        except ImageError as exc:
            return None, Skip(exc.path, exc.reason)

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, folder.paths))
    keep = [i for i, (px, _) in enumerate(results) if px is not None]
    folder.skipped.extend(s for _, s in results if s is not None)
    if not keep:
        raise DataError(f"no decodable images among {n} files (e.g. {folder.skipped[-1].path}: "
                        f"{folder.skipped[-1].reason})")
    pixels = np.stack([results[i][0] for i in keep])
    return Images(folder.labels[keep], spec, pixels=pixels)


@dataclass(frozen=True)
class Augment:
    """Inception-style augmentation (random resized crop, optional horizontal flip).

    ``min_area`` is higher than Inception's 0.08 because edge datasets are often
    small objects filling the frame (digits, parts), where an 8% crop removes
    the object. Flip is off by default: it changes the meaning of text and digits.
    """

    enabled: bool = True
    flip: bool = False
    min_area: float = 0.5

    def __post_init__(self):
        if not 0.05 <= self.min_area <= 1.0:
            raise ValueError(f"min crop area must be in [0.05, 1], got {self.min_area}")


def _lookup(images: Images):
    """A map fn from an index to uint8 pixels, from memory or decoded on the fly."""
    import tensorflow as tf

    size = images.spec.size
    if images.pixels is not None:
        table = tf.constant(images.pixels)
        return lambda i: tf.gather(table, i)
    paths = np.asarray(images.paths)
    spec = images.spec

    def decode(i):
        return pixels_for(paths[int(i)], spec)

    def load(i):
        px = tf.numpy_function(decode, [i], tf.uint8, stateful=False)
        return tf.ensure_shape(px, (size, size, 3))

    return load


def epoch_order(n: int, epoch: int, seed: int, steps: int, batch: int) -> np.ndarray:
    """The indices of one epoch, padded by wrapping so that every batch is full."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    reps = -(-steps * batch // n)
    return np.tile(order, reps)[: steps * batch]


def train_dataset(images: Images, *, epoch: int, seed: int, steps: int, batch: int, start_step: int = 0,
                  augment: Augment = Augment()):
    """Batches ``start_step..steps-1`` of ``epoch`` (float inputs in [-1, 1], int labels)."""
    import tensorflow as tf

    size = images.spec.size
    order = epoch_order(len(images), epoch, seed, steps, batch)
    positions = np.arange(len(order), dtype=np.int64)
    first = start_step * batch
    ds = tf.data.Dataset.from_tensor_slices((order[first:].astype(np.int64), positions[first:]))
    lookup = _lookup(images)
    labels = tf.constant(images.labels)

    def load(i, pos):
        px = tf.cast(lookup(i), tf.float32)
        if augment.enabled:
            s = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64) * 100_000_000 + pos])
            begin, box, _ = tf.image.stateless_sample_distorted_bounding_box(
                [size, size, 3], tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=s, min_object_covered=0.0,
                aspect_ratio_range=(0.75, 4 / 3), area_range=(augment.min_area, 1.0), max_attempts=10,
                use_image_if_no_bounding_boxes=True)
            px = tf.slice(px, begin, box)
            px = tf.image.resize(px[None], (size, size), method="bilinear")[0]
            if augment.flip:
                px = tf.image.stateless_random_flip_left_right(px, seed=s + 1)
        return scale_tf(px), tf.gather(labels, i)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _finish(ds.batch(batch, drop_remainder=True))


def eval_dataset(images: Images, batch: int):
    import tensorflow as tf

    lookup = _lookup(images)
    labels = tf.constant(images.labels)
    ds = tf.data.Dataset.range(len(images)).map(lambda i: (scale_tf(lookup(i)), tf.gather(labels, i)),
                                                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _finish(ds.batch(batch))


def _finish(ds):
    import tensorflow as tf

    options = tf.data.Options()
    # Index datasets are not files: shard by data across workers, explicitly (AUTO warns, then does this).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

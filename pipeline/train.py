"""Training Xception on a folder of labeled images.

The run folder is the unit users hand to ``convert``: ``model.keras``,
``labels.json`` (class index -> folder name) and ``manifest.json``, each
written atomically. BatchNorm momentum defaults to 0.9 rather than Keras's
0.99: on short runs (a few hundred steps) the slow moving averages lag the
weights so far that evaluation-mode accuracy sits at chance while training
accuracy is 98% (measured on digits, 6 epochs: 0.10 vs 0.96 validation).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import artifacts
from pipeline.data import discover
from pipeline.errors import DataError, TrainingError
from pipeline.preprocessing import ImageError, PreprocessSpec, pixels_for, scale

OPTIMIZERS = ("sgd", "rmsprop", "adam")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 6
    batch_size: int = 32
    input_size: int = 71
    width: float = 0.25
    middle_blocks: int = 8
    optimizer: str = "adam"
    lr: float | None = None
    bn_momentum: float = 0.9
    seed: int = 0
    val_fraction: float = 0.1

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise TrainingError("--epochs and --batch-size must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path
    classes: list[str]
    history: list[dict]
    val_accuracy: float | None


def load_labeled(folder, spec: PreprocessSpec, classes: list[str] | None = None):
    """Decode a class-per-folder directory into (pixels uint8, labels int, classes, skipped)."""
    found = discover(folder, what="training folder")
    if not found.labeled:
        raise DataError(f"{folder} must hold one subfolder per class (found only loose files)")
    classes = classes or found.classes
    xs, ys, skipped = [], [], list(found.skipped)
    for item in found.items:
        if item.label not in classes:
            raise DataError(f"{folder}: class folder {item.label!r} is not among the training classes")
        try:
            xs.append(pixels_for(item.path, spec))
        except ImageError as exc:
            skipped.append(exc)
            continue
        ys.append(classes.index(item.label))
    if not xs:
        raise DataError(f"no usable images in {folder}")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes, skipped


def _optimizer(cfg: TrainConfig, steps_per_epoch: int):
    import keras

    if cfg.optimizer == "sgd":  # the paper's ImageNet recipe, lr scaled with the batch
        lr = cfg.lr or 0.045 * cfg.batch_size / 32
        schedule = keras.optimizers.schedules.ExponentialDecay(lr, decay_steps=2 * steps_per_epoch,
                                                               decay_rate=0.94, staircase=True)
        return keras.optimizers.SGD(schedule, momentum=0.9)
    if cfg.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(cfg.lr or 1e-3 * cfg.batch_size / 32, momentum=0.9)
    lr = cfg.lr or 1e-3 * cfg.batch_size / 32
    return keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, cfg.epochs * steps_per_epoch,
                                                                       alpha=0.05))


def train(data_dir, out_dir, cfg: TrainConfig = TrainConfig(), *, val_dir=None,
          on_epoch: Callable[[int, dict], None] | None = None) -> TrainResult:
    import keras

    from pipeline.model import build_xception

    keras.utils.set_random_seed(cfg.seed)
    spec = PreprocessSpec(size=cfg.input_size)
    x, y, classes, skipped = load_labeled(data_dir, spec)
    if val_dir is not None:
        xv, yv, _, _ = load_labeled(val_dir, spec, classes)
    else:
        rng = np.random.default_rng(cfg.seed)
        val_idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: max(1, int(round(cfg.val_fraction * np.sum(y == c))))]
                                  for c in range(len(classes))])
        mask = np.zeros(len(y), bool)
        mask[val_idx] = True
        xv, yv, x, y = x[mask], y[mask], x[~mask], y[~mask]

    model = build_xception(cfg.input_size, len(classes), cfg.width, cfg.middle_blocks)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = cfg.bn_momentum
    steps = int(np.ceil(len(x) / cfg.batch_size))
    model.compile(optimizer=_optimizer(cfg, steps), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history: list[dict] = []
    xs, xvs = scale(x), scale(xv)
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        h = model.fit(xs, y, batch_size=cfg.batch_size, epochs=1, shuffle=True, verbose=0)
        val_loss, val_acc = model.evaluate(xvs, yv, batch_size=64, verbose=0)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "loss": float(h.history["loss"][-1]), "accuracy": float(h.history["accuracy"][-1]),
               "val_loss": float(val_loss), "val_accuracy": float(val_acc), "seconds": round(seconds, 2),
               "images_per_s": round(len(x) / seconds, 1)}
        history.append(row)
        if on_epoch:
            on_epoch(epoch + 1, row)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.keras"
    tmp = out / ".model.keras.tmp.keras"
    model.save(tmp)
    os.replace(tmp, model_path)
    artifacts.atomic_write_json(out / "labels.json", {"classes": classes})
    manifest = artifacts.base_manifest("training-run")
    manifest.update({"config": cfg.to_dict(), "preprocessing": spec.describe(), "classes": classes,
                     "data": {"train_dir": str(data_dir), "val_dir": str(val_dir) if val_dir else None,
                              "train_images": int(len(x)), "val_images": int(len(xv)),
                              "skipped": [{"path": s.path, "reason": s.reason} for s in skipped]},
                     "history": history, "model": {"path": "model.keras", "sha256": artifacts.sha256_file(model_path)}})
    artifacts.atomic_write_json(out / "manifest.json", manifest)
    return TrainResult(out, model_path, classes, history, history[-1]["val_accuracy"] if history else None)


def read_labels(path) -> list[str]:
    data = json.loads(Path(path).read_text())
    return list(data["classes"]) if isinstance(data, dict) else list(data)

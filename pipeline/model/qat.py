"""Quantization-aware fine-tuning: a trained float Xception learns to live with int8 rounding.

Post-training int8 quantization guesses activation ranges from a few
hundred calibration images; QAT trains with the rounding in the forward pass
(tfmot's ``quantize_model``: fake-quant on weights and activations), so the
converted int8 model needs no calibration set and usually loses less accuracy.

tfmot only wraps tf_keras (Keras 2) models, so the Keras 3 model is
translated first (``model_tfkeras``, which also splits separable convs to
avoid tfmot's separable-conv bugs). The result is saved as a tf_keras
``model.h5``: tf_keras 2.21 saves a QAT model as ``.keras`` but cannot load
it back (``quantize_layer`` expects 5 variables, the file holds 3; measured),
while ``.h5`` round-trips exactly under ``quantize_scope``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.core import artifacts
from pipeline.core.errors import Remedy, TrainingError
from pipeline.model import tfdata
from pipeline.model.model_tfkeras import translate
from pipeline.model.modelio import load_source
from pipeline.model.tfmot_import import import_tfmot
from pipeline.model.train import (
    BatchHook,
    EpochHook,
    TrainResult,
    check_positive,
    link_latest,
    mean_throughput,
    prepare_data,
    read_labels,
)

QAT_MODEL = "model.h5"


@dataclass(frozen=True)
class QatConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float | None = None  # per 32 images; default 1e-4: fine-tuning, not training from scratch
    seed: int = 0
    val_fraction: float = 0.1
    augment: bool = True
    flip: bool = False
    min_crop_area: float = 0.5

    def __post_init__(self):
        check_positive(self)

    def to_dict(self) -> dict:
        return asdict(self)


def quantize_aware(model):
    """A tf_keras QAT model with the float ``model``'s weights."""

    tfmot = import_tfmot()
    twin = translate(model)
    try:
        return tfmot.quantization.keras.quantize_model(twin)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise TrainingError(f"tfmot could not prepare the model for quantization-aware training: "
                            f"{str(exc).splitlines()[0][:200]}") from None


def qat(model_path, data_dir, out_dir, cfg: QatConfig = QatConfig(), *, val_dir=None,
        on_epoch: EpochHook | None = None, on_batch: BatchHook | None = None, trust_code: bool = False) -> TrainResult:
    """Fine-tune ``model_path`` quantization-aware on ``data_dir``; write a run folder like ``train``."""
    import tf_keras

    out = Path(out_dir)
    source = _keras3_source(model_path, out, trust_code)
    tf_keras.utils.set_random_seed(cfg.seed)
    spec, classes, train_images, val_images, data = prepare_data(data_dir, val_dir, input_size=source.input_size,
                                                                 val_fraction=cfg.val_fraction, seed=cfg.seed)
    _check_classes(model_path, data_dir, classes, source.classes)

    model = quantize_aware(source.model)
    history = _fine_tune(model, cfg, train_images, val_images, on_epoch, on_batch)
    model_path_out = _save_model(model, out)
    artifacts.atomic_write_json(out / "labels.json", {"classes": classes})
    manifest = _manifest(model, model_path, model_path_out, cfg, spec, classes, data, history)
    artifacts.atomic_write_json(out / "manifest.json", manifest)
    link_latest(out)
    return TrainResult(out, model_path_out, classes, history, history[-1]["val_accuracy"], manifest)


def _keras3_source(model_path, out: Path, trust_code: bool):
    """The float model to fine-tune, refused before any work when ``out`` holds a run or it is not Keras 3."""

    if (out / QAT_MODEL).exists() or (out / "manifest.json").exists():
        raise TrainingError(f"{out} already holds a run", remedy=Remedy.ANOTHER_OUTPUT)
    source = load_source(model_path, trust_code=trust_code)
    if source.kind != "keras3":
        raise TrainingError(f"{model_path} is a {source.kind} model; QAT takes a Keras 3 model.keras from "
                            "xedge train")
    return source


def _check_classes(model_path, data_dir, classes: list[str], model_classes: int) -> None:
    """The data's classes must be the model's: as many, and in the order of its labels.json when one is beside it."""
    if len(classes) != model_classes:
        raise TrainingError(f"{data_dir} has {len(classes)} classes but the model predicts {model_classes}")
    labels_beside = Path(model_path).parent / "labels.json"
    if labels_beside.is_file() and read_labels(labels_beside) != classes:
        raise TrainingError(f"the class folders of {data_dir} differ from {labels_beside}; QAT must see the "
                            "classes the model was trained on, in the same order")


def _fine_tune(model, cfg: QatConfig, train_images, val_images, on_epoch: EpochHook | None,
               on_batch: BatchHook | None) -> list[dict]:
    """Compile and fit ``model`` one epoch at a time, evaluating after each; the history rows."""
    import tf_keras


    steps = max(1, -(-len(train_images) // cfg.batch_size))
    lr = (cfg.lr or 1e-4) * cfg.batch_size / 32
    model.compile(optimizer=tf_keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    augment = tfdata.Augment(cfg.augment, cfg.flip, cfg.min_crop_area)
    val_ds = tfdata.eval_dataset(val_images, cfg.batch_size)
    history: list[dict] = []

    class Progress(tf_keras.callbacks.Callback):
        def __init__(self, epoch):
            super().__init__()
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if on_batch:
                on_batch(self.epoch + 1, batch + 1, steps)

    for epoch in range(cfg.epochs):
        ds = tfdata.train_dataset(train_images, epoch=epoch, seed=cfg.seed, steps=steps, batch=cfg.batch_size,
                                  augment=augment)
        t0 = time.perf_counter()
        h = model.fit(ds, epochs=1, verbose=0, callbacks=[Progress(epoch)])
        seconds = time.perf_counter() - t0
        val_loss, val_acc = model.evaluate(val_ds, verbose=0)
        row = {"epoch": epoch + 1, "loss": float(h.history["loss"][-1]), "accuracy": float(h.history["accuracy"][-1]),
               "val_loss": float(val_loss), "val_accuracy": float(val_acc), "seconds": round(seconds, 2),
               "images_per_s": round(steps * cfg.batch_size / seconds, 1)}
        history.append(row)
        if on_epoch:
            on_epoch(epoch + 1, row)
    return history


def _save_model(model, out: Path) -> Path:
    """Write ``model.h5`` atomically (see the module docstring for why .h5)."""
    out.mkdir(parents=True, exist_ok=True)
    model_path_out = out / QAT_MODEL
    tmp = out / f".model.{os.getpid()}.tmp.h5"
    model.save(tmp, include_optimizer=False)
    os.replace(tmp, model_path_out)
    return model_path_out


def _manifest(model, model_path, model_path_out: Path, cfg: QatConfig, spec, classes, data, history) -> dict:
    """The run's manifest: settings, data, source, quantization scheme, history and the saved model."""
    import tensorflow as tf

    manifest = artifacts.base_manifest("qat-run")
    manifest.update({
        "config": cfg.to_dict(), "preprocessing": spec.describe(), "classes": classes, "data": data,
        "source": {"path": str(model_path), "sha256": artifacts.sha256_file(model_path)},
        "quantization": {"scheme": "tfmot default 8-bit (quantize_model)", "framework": "tf_keras",
                         "separable_convs": "split into depthwise + 1x1 conv before quantize_model"},
        "devices": {"kind": "gpu" if tf.config.list_physical_devices("GPU") else "cpu", "replicas": 1,
                    "global_batch": cfg.batch_size},
        "history": history, "images_per_s": mean_throughput(history),
        "model": {"path": QAT_MODEL, "sha256": artifacts.sha256_file(model_path_out),
                  "parameters": int(model.count_params())},
    })
    return manifest

"""Training Xception on a folder of labeled images, on CPU, one GPU, several GPUs or several machines.

The run folder is the unit users hand to ``convert``: ``model.keras``,
``labels.json`` (class index -> folder name) and ``manifest.json``, each
written atomically, plus TensorBoard logs. While training, ``.backup/``
holds the last checkpoint (weights, optimizer state, epoch, step, history);
the same command resumes from it, and a different configuration is refused.

Why not ``keras.callbacks.BackupAndRestore``: in Keras 3.15 it restores the
epoch but not the step inside it (the interrupted epoch is rerun on top of
mid-epoch weights), and it overwrites its ``.weights.h5`` in place, so a kill
during the write leaves a torn checkpoint. Here a checkpoint is written to a
new file and then named in ``state.json`` with an atomic rename, and each
epoch's batches are a pure function of (seed, epoch) (see ``tfdata``), so a
resumed run continues at the exact step. The checkpoint also holds the
interrupted epoch's loss and accuracy sums (as the float32 values the loop
had reached), so that epoch's figures cover all its steps; on one CPU with
the same seed a resumed run ends with the same weights, bit for bit, as one
that was never stopped (``tests/model/test_train.py``).

BatchNorm momentum defaults to 0.9 rather than Keras's 0.99: on short runs (a
few hundred steps) the slow moving averages lag the weights so far that
evaluation-mode accuracy sits at chance while training accuracy is 98%
(measured on digits, 6 epochs: 0.10 vs 0.96 validation).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.core import artifacts
from pipeline.core.data import Skip, discover
from pipeline.core.errors import DataError, ModelLoadError, Remedy, TrainingError, TrainingInterrupted
from pipeline.core.preprocessing import ImageError, PreprocessSpec, pixels_for
from pipeline.model import tfdata
from pipeline.model.steps import Steps
from pipeline.model.pretrained import load_by_order
from pipeline.model.xception import XceptionConfig, build_xception

OPTIMIZERS = ("sgd", "rmsprop", "adam")
SWITCHES = ("auto", "on", "off")
BACKUP = ".backup"
REFERENCE_BATCH = 32  # learning rates below are per 32 images and scaled linearly with the global batch


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 6
    batch_size: int = 32  # per replica (GPU); the global batch is this times the replicas
    input_size: int = 71
    width: float = 0.25
    middle_blocks: int = 2
    optimizer: str = "adam"
    lr: float | None = None  # per 32 images; None: the optimizer's default below
    bn_momentum: float = 0.9
    seed: int = 0
    val_fraction: float = 0.1
    augment: bool = True
    flip: bool = False
    min_crop_area: float = 0.5
    weights: str | None = None
    freeze: int = 0
    mixed_precision: str = "auto"  # auto: on for GPUs (bfloat16 from compute capability 8.0, else float16)
    xla: str = "auto"  # auto: on for GPUs
    checkpoint_every: int = 200  # steps between mid-epoch checkpoints (also at every epoch end)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        check_positive(self)
        if self.mixed_precision not in SWITCHES or self.xla not in SWITCHES:
            raise TrainingError("mixed precision and XLA are 'auto', 'on' or 'off'")
        if not 0.0 < self.val_fraction < 1.0:
            raise TrainingError(f"validation fraction must be in (0, 1), got {self.val_fraction}")
        if self.freeze < 0:
            raise TrainingError(f"the number of frozen layers cannot be negative, got {self.freeze}", setting="freeze")
        if self.checkpoint_every < 1:
            raise TrainingError(f"checkpoints are every 1 or more steps, got {self.checkpoint_every}",
                                setting="checkpoint_every")
        if not 0.05 <= self.min_crop_area <= 1.0:
            raise TrainingError(f"the smallest random crop must be in [0.05, 1] of the image area, got "
                                f"{self.min_crop_area}", setting="min_crop_area")
        try:
            XceptionConfig(input_size=self.input_size, classes=2, width=float(self.width),
                           middle_blocks=self.middle_blocks)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path
    classes: list[str]
    history: list[dict]
    val_accuracy: float | None
    manifest: dict = field(default_factory=dict)
    wrote: bool = True  # False on the non-chief workers of a multi-worker run, which write nothing


EpochHook = Callable[[int, dict], None]
BatchHook = Callable[[int, int, int], None]  # (epoch, step done, steps per epoch)


# ---------------------------------------------------------------- devices


@dataclass
class Devices:
    strategy: Any  # a tf.distribute strategy (TensorFlow is untyped)
    kind: str  # "cpu" | "gpu" | "multi-gpu" | "multi-worker"
    names: list[str]
    replicas: int
    is_chief: bool
    mixed_policy: str | None
    xla: bool


def _is_chief() -> bool:
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = tf_config.get("task") or {}
    cluster = tf_config.get("cluster") or {}
    if not task:
        return True
    if "chief" in cluster:
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def select_devices(cfg: TrainConfig) -> Devices:
    """All visible GPUs (synchronous data parallelism, as the paper); workers from TF_CONFIG."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if os.environ.get("TF_CONFIG"):
        strategy, kind = tf.distribute.MultiWorkerMirroredStrategy(), "multi-worker"
    elif len(gpus) > 1:
        strategy, kind = tf.distribute.MirroredStrategy(), "multi-gpu"
    else:
        strategy, kind = tf.distribute.get_strategy(), "gpu" if gpus else "cpu"
    names = [g.name for g in gpus] or ["CPU"]
    policy = None
    if cfg.mixed_precision == "on" or (cfg.mixed_precision == "auto" and gpus):
        capability = (0, 0)
        if gpus:
            capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability") or (0, 0)
        # bfloat16 needs no loss scaling; GPUs before Ampere (8.0) only have fast float16.
        policy = "mixed_bfloat16" if (not gpus or tuple(capability) >= (8, 0)) else "mixed_float16"
    xla = cfg.xla == "on" or (cfg.xla == "auto" and bool(gpus))
    return Devices(strategy, kind, names, int(strategy.num_replicas_in_sync), _is_chief(), policy, xla)


# ---------------------------------------------------------------- model and optimizer


def _schedule_lr(cfg: TrainConfig, global_batch: int) -> float:
    base = cfg.lr or {"sgd": 0.045, "rmsprop": 1e-3, "adam": 1e-3}[cfg.optimizer]
    return base * global_batch / REFERENCE_BATCH


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int, global_batch: int):
    import keras

    lr = _schedule_lr(cfg, global_batch)
    if cfg.optimizer == "sgd":  # the paper's ImageNet recipe: momentum 0.9, x0.94 every 2 epochs
        schedule = keras.optimizers.schedules.ExponentialDecay(lr, decay_steps=2 * steps_per_epoch,
                                                               decay_rate=0.94, staircase=True)
        return keras.optimizers.SGD(schedule, momentum=0.9)
    if cfg.optimizer == "rmsprop":  # the paper's JFT recipe: momentum 0.9
        return keras.optimizers.RMSprop(lr, momentum=0.9)
    return keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, cfg.epochs * steps_per_epoch,
                                                                       alpha=0.05))


def build_model(cfg: TrainConfig, classes: int, policy: str | None = None):
    """The training model: ``build_xception`` under ``policy``, BN momentum set, first ``freeze`` layers frozen."""
    import keras


    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy or "float32")
    try:
        model = build_xception(cfg.input_size, classes, cfg.width, cfg.middle_blocks)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    if policy:  # the softmax and the loss stay float32: bfloat16 probabilities keep ~3 significant digits
        model.get_layer("predictions").dtype_policy = keras.DTypePolicy("float32")
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = cfg.bn_momentum
    if cfg.freeze:
        body = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        if cfg.freeze >= len(body):
            raise TrainingError(f"freezing the first {cfg.freeze} layers would freeze all {len(body)}; nothing would "
                                "train", setting="freeze")
        for layer in body[: cfg.freeze]:
            layer.trainable = False
    return model


# ---------------------------------------------------------------- checkpoints


class Checkpoint:
    """``.backup/state.json`` names the current ``ckpt-N.npz``; both are replaced atomically."""

    def __init__(self, run_dir: Path, fingerprint: str, config: dict, write: bool):
        self.dir = Path(run_dir) / BACKUP
        self.fingerprint = fingerprint
        self.config = config
        self.write = write
        self.counter = 0

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    def load(self) -> dict | None:
        if not self.state_path.exists():
            return None
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            raise TrainingError(f"cannot read the checkpoint {self.state_path} ({exc}); delete {self.dir} "
                                "to start over") from None
        if state.get("fingerprint") != self.fingerprint:
            old = state.get("config", {})
            changed = [k for k in sorted(set(old) | set(self.config)) if old.get(k) != self.config.get(k)]
            what = ", ".join(f"{k}: {old.get(k)!r} -> {self.config.get(k)!r}" for k in changed[:6]) \
                or "the training data changed"
            raise TrainingError(f"{self.dir.parent} holds an unfinished run with a different configuration "
                                f"({what}); rerun with the same options and data to resume",
                                remedy=Remedy.ANOTHER_OUTPUT)
        self.counter = int(state.get("counter", 0))
        return state

    def save(self, model, optimizer, *, epoch: int, step: int, history: list[dict],
             sums: tuple[float, float] = (0.0, 0.0)) -> None:
        """``sums``: the epoch's (loss sum, correct predictions) over steps 1..``step``."""
        if not self.write:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.counter += 1
        name = f"ckpt-{self.counter}.npz"
        # Any: numpy's stubs read ``**arrays`` as possibly setting savez's allow_pickle flag.
        arrays: dict[str, Any] = {f"w{i}": np.asarray(v.numpy()) for i, v in enumerate(model.weights)}
        arrays.update({f"o{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)})
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)
        state = {"fingerprint": self.fingerprint, "config": self.config, "epoch": epoch, "step": step,
                 "epoch_sums": {"loss": float(sums[0]), "correct": float(sums[1])}, "history": history,
                 "checkpoint": name, "counter": self.counter, "saved": artifacts.now_iso()}
        artifacts.atomic_write_json(self.state_path, state)
        for old in self.dir.glob("ckpt-*.npz"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def restore(self, model, optimizer, state: dict) -> None:
        with np.load(self.dir / state["checkpoint"]) as data:
            weights = [data[f"w{i}"] for i in range(len(model.weights))]
            n_opt = sum(1 for k in data.files if k.startswith("o"))
            opt = [data[f"o{i}"] for i in range(n_opt)]
        for var, value in zip(model.weights, weights):
            var.assign(value)
        if len(opt) != len(optimizer.variables):
            raise TrainingError(f"checkpoint {state['checkpoint']} does not match this optimizer; delete "
                                f"{self.dir} to start over")
        for var, value in zip(optimizer.variables, opt):
            var.assign(value)

    def remove(self) -> None:
        if self.write:
            shutil.rmtree(self.dir, ignore_errors=True)


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the training loop checkpoints after the current step and stops cleanly."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to the host program
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now, the last checkpoint stays
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ---------------------------------------------------------------- the run


def check_positive(cfg) -> None:
    """The epochs, batch size and learning rate every training configuration needs (``TrainConfig``, and
    ``QatConfig`` for quantization-aware fine-tuning)."""
    for setting in ("epochs", "batch_size"):
        if getattr(cfg, setting) < 1:
            raise TrainingError(f"{setting.replace('_', ' ')} must be at least 1, got {getattr(cfg, setting)}",
                                setting=setting)
    if cfg.lr is not None and not cfg.lr > 0:
        raise TrainingError(f"the learning rate must be positive, got {cfg.lr}", setting="lr")


def _fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def default_run_dir(root: str | os.PathLike = "runs") -> Path:
    return Path(root) / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def link_latest(run_dir: Path) -> Path | None:
    """``runs/latest`` -> the newest run, replaced atomically, when the run lives in a ``runs/`` folder."""
    run_dir = Path(run_dir)
    if run_dir.resolve().parent.name != "runs":
        return None
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)
    return link


def latest_model(root: str | os.PathLike = "runs") -> Path:
    """The model of the newest run that ``link_latest`` points to: ``model.keras`` from ``train``, or
    ``model.h5`` from a quantization-aware run (``pipeline.model.qat``)."""
    for name in ("model.keras", "model.h5"):
        candidate = Path(root) / "latest" / name
        if candidate.exists():
            return candidate
    raise ModelLoadError(f"no model given and no training run at {Path(root) / 'latest'}", remedy=Remedy.MODEL_PATH)


def prepare_data(data_dir, val_dir, *, input_size: int, val_fraction: float, seed: int):
    spec = PreprocessSpec(size=input_size)
    folder = tfdata.list_labeled(data_dir)
    train_digest, method = tfdata.digest(folder.paths, data_dir)
    data: dict[str, Any] = {"train_dir": str(data_dir), "val_dir": str(val_dir) if val_dir else None,
            "digest": train_digest, "digest_method": method}
    images = tfdata.load_images(folder, spec)
    if val_dir is not None:
        vfolder = tfdata.list_labeled(val_dir, folder.classes)
        data["val_digest"] = tfdata.digest(vfolder.paths, val_dir)[0]
        val = tfdata.load_images(vfolder, spec)
        skipped = folder.skipped + vfolder.skipped
        train = images
    else:
        train_idx, val_idx = tfdata.stratified_split(images.labels, val_fraction, seed)
        train, val, skipped = images.subset(train_idx), images.subset(val_idx), folder.skipped
        data["split"] = f"stratified {val_fraction:.0%} of {data_dir} (seed {seed})"
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"{data_dir} has too few images to train and validate ({len(train)} / {len(val)})")
    data.update({"train_images": len(train), "val_images": len(val), "cached_in_memory": train.pixels is not None,
                 "skipped": [s.to_dict() for s in skipped]})
    return spec, folder.classes, train, val, data


@dataclass
class _Run:
    """Everything one training run holds between its steps: data, devices, model, optimizer, checkpoint."""
    out: Path
    cfg: TrainConfig
    devices: Devices
    spec: PreprocessSpec
    classes: list[str]
    train_images: tfdata.Images
    val_images: tfdata.Images
    data: dict
    global_batch: int
    steps: int
    ckpt: Checkpoint
    state: dict | None
    model: Any  # a keras.Model (keras is untyped)
    optimizer: Any  # a keras optimizer
    pretrained: dict | None
    loop: Steps


def train(data_dir, out_dir, cfg: TrainConfig = TrainConfig(), *, val_dir=None,
          on_epoch: EpochHook | None = None, on_batch: BatchHook | None = None) -> TrainResult:
    """Train (or resume) a run; write model.keras, labels.json, manifest.json and TensorBoard logs."""
    out = Path(out_dir)
    if (out / "manifest.json").exists() and (out / "model.keras").exists() and not (out / BACKUP).exists():
        raise TrainingError(f"{out} already holds a finished run", remedy=Remedy.ANOTHER_OUTPUT)
    run = _start_run(data_dir, out, cfg, val_dir)
    state = run.state
    history: list[dict] = list(state["history"]) if state else []
    start_epoch, start_step = (int(state["epoch"]), int(state["step"])) if state else (0, 0)
    resumed = {"epoch": start_epoch, "step": start_step} if state else None
    writers = _summary_writers(out / "logs") if run.devices.is_chief else None
    val_ds = tfdata.eval_dataset(run.val_images, run.global_batch)
    # Signals are only honoured alone: every worker of a multi-worker run must stop at the same step.
    honour_signals = run.devices.kind != "multi-worker"

    with _StopFlag() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            first = start_step if epoch == start_epoch else 0
            history.append(_train_epoch(run, epoch, first, state if epoch == start_epoch else None, history,
                                        stop if honour_signals else None, on_batch, val_ds))
            if writers:
                _write_summaries(writers, history[-1], epoch + 1)
            if epoch + 1 < cfg.epochs:
                run.ckpt.save(run.model, run.optimizer, epoch=epoch + 1, step=0, history=history)
            if on_epoch:
                on_epoch(epoch + 1, history[-1])
            if honour_signals and stop.signum is not None and epoch + 1 < cfg.epochs:
                raise _interrupted(stop.signum, epoch, run.ckpt)

    manifest = _run_manifest(run, history, resumed)
    if run.devices.is_chief:
        _write_outputs(out, run.model, cfg, run.classes, manifest)
        run.ckpt.remove()
        link_latest(out)
    return TrainResult(out, out / "model.keras", run.classes, history,
                       history[-1]["val_accuracy"] if history else None, manifest, wrote=run.devices.is_chief)


def _start_run(data_dir, out: Path, cfg: TrainConfig, val_dir) -> _Run:
    """Devices, data, the model and optimizer, restored from the checkpoint when there is one."""
    import keras

    devices = select_devices(cfg)
    keras.utils.set_random_seed(cfg.seed)
    spec, classes, train_images, val_images, data = prepare_data(data_dir, val_dir, input_size=cfg.input_size,
                                                                 val_fraction=cfg.val_fraction, seed=cfg.seed)
    global_batch = cfg.batch_size * devices.replicas
    steps = max(1, -(-len(train_images) // global_batch))
    config = {**cfg.to_dict(), "classes": classes, "data_digest": data["digest"],
              "val_digest": data.get("val_digest"), "replicas": devices.replicas}
    ckpt = Checkpoint(out, _fingerprint(config), config, write=devices.is_chief)
    state = ckpt.load()
    with devices.strategy.scope():
        model = build_model(cfg, len(classes), devices.mixed_policy)
        pretrained = load_by_order(model, cfg.weights) if cfg.weights and state is None else None
        optimizer = make_optimizer(cfg, steps, global_batch)
        if devices.mixed_policy == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
        if state is not None:
            ckpt.restore(model, optimizer, state)
    loop = Steps(model, optimizer, devices.strategy, global_batch, devices.xla)
    return _Run(out, cfg, devices, spec, classes, train_images, val_images, data, global_batch, steps, ckpt, state,
                model, optimizer, pretrained, loop)


def _train_epoch(run: _Run, epoch: int, first: int, state: dict | None, history: list[dict],
                 stop: _StopFlag | None, on_batch: BatchHook | None, val_ds) -> dict:
    """One epoch from step ``first``, then its evaluation, as a history row: checkpoints every ``checkpoint_every`` steps, and on a signal (``stop``
    is None when signals are not honoured) checkpoints and raises ``TrainingInterrupted``."""
    cfg, steps, global_batch = run.cfg, run.steps, run.global_batch
    augment = tfdata.Augment(cfg.augment, cfg.flip, cfg.min_crop_area)
    ds = tfdata.train_dataset(run.train_images, epoch=epoch, seed=cfg.seed, steps=steps, batch=global_batch,
                              start_step=first, augment=augment)
    iterator = iter(run.loop.distribute(ds))
    loss_sum, correct, counted_from = _epoch_sums(state, first)
    t0 = time.perf_counter()
    for step in range(first + 1, steps + 1):
        l_, c_ = run.loop.train_step(iterator)
        loss_sum, correct = loss_sum + l_, correct + c_
        if on_batch:
            on_batch(epoch + 1, step, steps)
        signum = stop.signum if stop is not None else None
        if step < steps and (signum is not None or step % cfg.checkpoint_every == 0):
            run.ckpt.save(run.model, run.optimizer, epoch=epoch, step=step, history=history,
                          sums=(loss_sum, correct))
        if signum is not None and step < steps:
            raise _interrupted(signum, epoch, run.ckpt)
    loss_sum, correct = float(loss_sum), float(correct)  # waits for the last step
    seconds = time.perf_counter() - t0
    seen = (steps - counted_from) * global_batch  # the images the loss and accuracy cover
    ran = (steps - first) * global_batch  # the images this process trained on, for the rate
    val_loss, val_acc = run.loop.evaluate(val_ds)
    row = {"epoch": epoch + 1, "loss": loss_sum / seen, "accuracy": correct / seen, "val_loss": val_loss,
           "val_accuracy": val_acc, "seconds": round(seconds, 2), "images_per_s": round(ran / seconds, 1)}
    if first:
        row["resumed_at_step"] = first
    if counted_from:  # a checkpoint from before the sums were saved
        row["metrics_from_step"] = counted_from
    return row


def _run_manifest(run: _Run, history: list[dict], resumed: dict | None) -> dict:
    import tensorflow as tf

    devices, cfg = run.devices, run.cfg
    manifest = artifacts.base_manifest("training-run")
    manifest.update({
        "config": cfg.to_dict(), "preprocessing": run.spec.describe(), "classes": run.classes, "data": run.data,
        "devices": {"kind": devices.kind, "names": devices.names, "replicas": devices.replicas,
                    "global_batch": run.global_batch, "mixed_precision": devices.mixed_policy, "xla": devices.xla,
                    "tensorflow_devices": [d.name for d in tf.config.list_logical_devices()]},
        "optimizer": {"name": cfg.optimizer, "lr": _schedule_lr(cfg, run.global_batch), "steps_per_epoch": run.steps,
                      "steps": int(run.optimizer.iterations.numpy())},
        "pretrained": run.pretrained, "resumed_from": resumed, "history": history,
        "images_per_s": mean_throughput(history),
    })
    return manifest


def _epoch_sums(state: dict | None, first: int) -> tuple[float, float, int]:
    """(loss sum, correct, first step they cover) to start an epoch with: a resumed epoch goes on from the
    checkpoint's sums, exactly the float32 values the interrupted loop held."""
    sums = (state or {}).get("epoch_sums")
    if not first:
        return 0.0, 0.0, 0
    if sums is None:
        return 0.0, 0.0, first
    return float(sums["loss"]), float(sums["correct"]), 0


def _summary_writers(logs: Path) -> dict:
    import tensorflow as tf

    return {"train": tf.summary.create_file_writer(str(logs / "train")),
            "validation": tf.summary.create_file_writer(str(logs / "validation"))}


def _write_summaries(writers: dict, row: dict, epoch: int) -> None:
    """TensorBoard scalars per epoch, with Keras's names (epoch_loss, epoch_accuracy) under train/validation."""
    import tensorflow as tf

    for split, prefix in (("train", ""), ("validation", "val_")):
        with writers[split].as_default():
            tf.summary.scalar("epoch_loss", row[f"{prefix}loss"], step=epoch)
            tf.summary.scalar("epoch_accuracy", row[f"{prefix}accuracy"], step=epoch)
            if split == "train":
                tf.summary.scalar("images_per_s", row["images_per_s"], step=epoch)
        writers[split].flush()


def _interrupted(signum: int | None, epoch: int, ckpt: Checkpoint) -> TrainingInterrupted:
    name = signal.Signals(signum).name if signum else "a signal"
    return TrainingInterrupted(f"stopped by {name} in epoch {epoch + 1}; checkpoint saved in {ckpt.dir}; "
                               "run the same command to resume",
                               exit_code=130 if signum == signal.SIGINT else 143)


def mean_throughput(history: list[dict]) -> float | None:
    """Mean training images/s, leaving out the first epoch (tracing, XLA compilation) when there are more."""
    rates = [r["images_per_s"] for r in history]
    rates = rates[1:] if len(rates) > 1 else rates
    return round(float(np.mean(rates)), 1) if rates else None


def _write_outputs(out: Path, model, cfg: TrainConfig, classes: list[str], manifest: dict) -> None:
    """The saved model is always float32 and fully trainable, whatever policy and freezing trained it."""
    out.mkdir(parents=True, exist_ok=True)
    plain = build_model(TrainConfig(**{**cfg.to_dict(), "freeze": 0}), len(classes), None)
    plain.set_weights([np.asarray(w, dtype=np.float32) for w in model.get_weights()])
    model_path = out / "model.keras"
    tmp = out / f".model.{os.getpid()}.tmp.keras"
    plain.save(tmp)
    os.replace(tmp, model_path)
    artifacts.atomic_write_json(out / "labels.json", {"classes": classes})
    manifest["model"] = {"path": "model.keras", "sha256": artifacts.sha256_file(model_path),
                         "parameters": int(plain.count_params())}
    artifacts.atomic_write_json(out / "manifest.json", manifest)


# ---------------------------------------------------------------- helpers kept for other modules


def load_labeled(folder, spec: PreprocessSpec, classes: list[str] | None = None):
    """Decode a class-per-folder directory into (pixels uint8, labels int, classes, skipped)."""
    found = discover(folder, what="training folder")
    if found.classes is None:
        raise DataError(f"{folder} must hold one subfolder per class (found only loose files)")
    classes = classes or found.classes
    xs, ys = [], []
    skipped: list[Skip | ImageError] = list(found.skipped)
    for item in found.items:
        if item.label not in classes:
            raise DataError(f"{folder}: class folder {item.label!r} is not among the training classes")
        try:
            xs.append(pixels_for(item.path, spec))
        except ImageError as exc:
            skipped.append(exc)
            continue
        ys.append(classes.index(item.class_name))
    if not xs:
        raise DataError(f"no usable images in {folder}")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes, skipped


def read_labels(path) -> list[str]:
    data = json.loads(Path(path).read_text())
    return list(data["classes"]) if isinstance(data, dict) else list(data)

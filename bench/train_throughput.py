"""Training images/s of Xception for a size, width and batch sweep, on whatever devices are visible.

The measured step is the product's own (``pipeline.model.steps.Steps`` under the
strategy ``xedge train`` would pick, fed by ``pipeline.model.tfdata`` with
augmentation on), so the figure is what a user gets, input pipeline included.
The images are synthetic uint8 pixels held in memory: decoding is a one-off
cost in ``xedge train`` (the decoded pixels are cached), not a per-step one.

    python -m bench.train_throughput --input-size 299 --width 1.0 --middle-blocks 8 \\
        --batch-sizes 64,128,256 --mixed-precision on --xla on --out bench/results/gpu_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench.machine import describe, load_average
from pipeline.core import artifacts
from pipeline.core.preprocessing import PreprocessSpec
from pipeline.model import tfdata
from pipeline.model.steps import Steps
from pipeline.model.train import TrainConfig, build_model, make_optimizer, select_devices


def _gpu_memory() -> dict | None:
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return None
    info = tf.config.experimental.get_memory_info("GPU:0")
    return {"peak_gib": round(info["peak"] / 2**30, 2), "current_gib": round(info["current"] / 2**30, 2)}


def measure(args) -> dict:
    load_at_start = load_average()
    cfg = TrainConfig(input_size=args.input_size, width=args.width, middle_blocks=args.middle_blocks,
                      mixed_precision=args.mixed_precision, xla=args.xla, optimizer=args.optimizer)
    devices = select_devices(cfg)
    images = _synthetic_images(args)
    results = []
    for per_replica in args.batch_sizes:
        row = _measure_batch(args, cfg, devices, images, per_replica)
        mem = (row.get("gpu_memory") or {}).get("peak_gib")
        print(f"batch {per_replica} per replica ({row['global_batch']} global): "
              f"{row.get('images_per_s', row.get('error'))} images/s, peak GPU memory {mem} GiB, "
              f"warm-up {row.get('warmup_s')} s", file=sys.stderr, flush=True)
        results.append(row)
        if "error" in row:
            break
    return _report(args, devices, results, load_at_start)


def _synthetic_images(args) -> tfdata.Images:
    """``args.pool`` random uint8 images with random labels, held in memory (no decoding in the measured steps)."""
    import numpy as np

    rng = np.random.default_rng(0)
    pool = args.pool
    return tfdata.Images(rng.integers(0, args.classes, pool), PreprocessSpec(size=args.input_size),
                         pixels=rng.integers(0, 256, (pool, args.input_size, args.input_size, 3), dtype=np.uint8))


def _measure_batch(args, cfg, devices, images, per_replica: int) -> dict:
    """One batch size: a fresh model, warm-up steps (tracing, XLA), then the timed steps; or out of memory."""
    import tensorflow as tf

    global_batch = per_replica * devices.replicas
    with devices.strategy.scope():
        model = build_model(cfg, args.classes, devices.mixed_policy)
        optimizer = make_optimizer(cfg, 100, global_batch)
        optimizer.build(model.trainable_variables)
    loop = Steps(model, optimizer, devices.strategy, global_batch, devices.xla)
    ds = tfdata.train_dataset(images, epoch=0, seed=0, steps=args.warmup + args.steps, batch=global_batch,
                              augment=tfdata.Augment(enabled=not args.no_augment))
    if tf.config.list_physical_devices("GPU"):
        tf.config.experimental.reset_memory_stats("GPU:0")
    row = {"batch_per_replica": per_replica, "global_batch": global_batch}
    try:
        iterator = iter(loop.distribute(ds))
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            float(loop.train_step(iterator)[0])
        row["warmup_s"] = round(time.perf_counter() - t0, 2)  # tracing and XLA compilation
        t0 = time.perf_counter()
        total = 0.0
        for _ in range(args.steps):
            total = total + loop.train_step(iterator)[0]
        float(total)  # waits for the last step
        seconds = time.perf_counter() - t0
        row.update({"steps": args.steps, "seconds": round(seconds, 3),
                    "images_per_s": round(args.steps * global_batch / seconds, 1), "gpu_memory": _gpu_memory()})
    except tf.errors.ResourceExhaustedError:
        row["error"] = "out of memory"
    return row


def _report(args, devices, results: list[dict], load_at_start) -> dict:
    return {"bench": "train_throughput", "created": artifacts.now_iso(), "versions": artifacts.versions(),
            "machine": describe(load_at_start),
            "command": " ".join(["python -m bench.train_throughput", *sys.argv[1:]]),
            "model": {"input_size": args.input_size, "width": args.width, "middle_blocks": args.middle_blocks,
                      "classes": args.classes},
            "devices": {"kind": devices.kind, "names": devices.names, "replicas": devices.replicas,
                        "mixed_precision": devices.mixed_policy, "xla": devices.xla,
                        "cpu_count": os.cpu_count()},
            "augment": not args.no_augment, "optimizer": args.optimizer, "results": results,
            "best_images_per_s": max((r.get("images_per_s", 0) for r in results), default=0)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input-size", type=int, default=299)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--middle-blocks", type=int, default=8)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[32],
                   help="comma-separated batch sizes per replica (GPU)")
    p.add_argument("--steps", type=int, default=20, help="measured steps per batch size")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (tracing, XLA compilation)")
    p.add_argument("--pool", type=int, default=512, help="distinct synthetic images")
    p.add_argument("--mixed-precision", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--xla", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--optimizer", choices=["sgd", "rmsprop", "adam"], default="sgd")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    args = p.parse_args(argv)

    from pipeline.core.tf_logs import import_tensorflow_quietly

    import_tensorflow_quietly()
    report = measure(args)
    text = json.dumps(report, indent=2)
    if args.out:
        from pipeline.core.artifacts import atomic_write_bytes

        atomic_write_bytes(args.out, (text + "\n").encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The whole pipeline on the embedded digits data, as one function.

Steps that live outside ``pipeline/`` (building the calibration set, the
device bench) are passed in as callables, so this module keeps the one-way
dependency rule and the CLI stays a thin caller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.conversion.export import ConvertSettings, ExportResult, export_tflite
from pipeline.conversion.settings import Representative
from pipeline.core.data import write_model_size_rgb
from pipeline.core.digits import write_digits
from pipeline.core.preprocessing import PreprocessSpec
from pipeline.model.train import TrainConfig, train
from pipeline.validation.validate import ValidationResult, validate


@dataclass
class DemoResult:
    out: Path
    folders: dict
    run_dir: Path
    val_accuracy: float | None
    exports: dict[str, ExportResult] = field(default_factory=dict)  # by mode
    steps: list[tuple[str, float]] = field(default_factory=list)
    validation: ValidationResult | None = None  # int8 against the float model
    bench: dict | None = None  # devices.bench.compare of float (A) and int8 (B) on this machine


def run_demo(out, *, build_calibration: Callable[[Path, PreprocessSpec], Representative],
             say: Callable[[str], None] = lambda s: None,
             on_epoch=None, on_calibration=None, config: TrainConfig | None = None,
             force: bool = True, bench: Callable[[dict[str, Path]], dict] | None = None) -> DemoResult:
    out = Path(out)
    cfg = config or TrainConfig(epochs=6, input_size=71, width=0.25, middle_blocks=2)
    steps: list[tuple[str, float]] = []

    t = time.perf_counter()
    say(f"writing scikit-learn's digits to {out / 'data'}")
    folders = write_digits(out / "data")
    steps.append(("data", time.perf_counter() - t))

    t = time.perf_counter()
    say(f"training Xception (input {cfg.input_size}, width {cfg.width}, {cfg.middle_blocks} middle blocks, "
        f"{cfg.epochs} epochs)")
    run = train(folders["train"], out / "run", cfg, val_dir=folders["val"], on_epoch=on_epoch)
    steps.append(("train", time.perf_counter() - t))

    say(f"writing the held-out digits as {cfg.input_size}x{cfg.input_size} RGB PNGs to {out / 'data' / 'val_rgb'} "
        "(what a client such as MediaPipe is handed)")
    folders["val_rgb"] = write_model_size_rgb(folders["val"], out / "data" / "val_rgb", cfg.input_size)
    result = DemoResult(out, folders, run.run_dir, run.val_accuracy, steps=steps)
    t = time.perf_counter()
    say("converting to float32 TFLite")
    result.exports["float"] = export_tflite(run.model_path, ConvertSettings("float"),
                                            out=out / "model_float.tflite", force=force)
    steps.append(("convert float", time.perf_counter() - t))

    t = time.perf_counter()
    say(f"converting to full-integer int8, calibrated on {folders['samples']}")
    calibration = build_calibration(folders["samples"], PreprocessSpec(size=cfg.input_size))
    result.exports["int8"] = export_tflite(run.model_path, ConvertSettings("int8"), out=out / "model_int8.tflite",
                                           representative=calibration, force=force, progress=on_calibration)
    steps.append(("convert int8", time.perf_counter() - t))

    result.validation = validate_step(result, say=say)

    if bench is not None:
        t = time.perf_counter()
        say("benching the float and int8 models on this machine (runs alternate, fresh process)")
        result.bench = bench({mode: exported.path for mode, exported in result.exports.items()})
        steps.append(("bench", time.perf_counter() - t))
    return result


def validate_step(result: DemoResult, *, say: Callable[[str], None] = lambda s: None,
                  progress=None) -> ValidationResult:
    """Drift of the int8 model against the float Keras model on the held-out digits."""

    t = time.perf_counter()
    say(f"validating int8 against the float model on {result.folders['val']}")
    validation = validate(result.run_dir / "model.keras", result.exports["int8"].path, result.folders["val"],
                          result.out / "report", progress=progress)
    result.steps.append(("validate", time.perf_counter() - t))
    return validation

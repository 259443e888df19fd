"""The command line: ``convert`` and the ``xedge`` group.

Thin on purpose: each command parses its options, calls one library
function, and prints. TensorFlow is imported inside commands only, so
``--help`` answers instantly. Library errors (``XedgeError``) become one
line on stderr and an exit code; nothing else is caught, so a real bug still
shows its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
LATEST_RUN = Path("runs") / "latest"


def _console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def guarded(fn=None, *, tensorflow: bool = True):
    """Turn library errors into ``error: ...`` and their exit code.

    Commands that use TensorFlow import it here, with its start-up log
    captured, so the user sees the tool's output and not TensorFlow's.
    """
    if fn is None:
        return functools.partial(guarded, tensorflow=tensorflow)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.errors import XedgeError
        from pipeline.quiet import import_tensorflow_quietly, quiet_tensorflow

        quiet_tensorflow()
        try:
            if tensorflow:
                import_tensorflow_quietly()
            return fn(*args, **kwargs)
        except XedgeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; no partial output was left behind", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


class Bar:
    """A rich progress bar driven by the library's (done, total) callbacks."""

    def __init__(self, description: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), console=_console(), transient=True)
        self._description = description
        self._task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._task is not None:
            self._progress.stop()
        return False

    def __call__(self, done: int, total: int) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(self._description, total=total)
        self._progress.update(self._task, completed=done, total=total)


def _resolve_model(model: str | None) -> Path:
    from pipeline.errors import ModelLoadError

    if model:
        return Path(model)
    candidate = LATEST_RUN / "model.keras"
    if candidate.exists():
        return candidate
    raise ModelLoadError("no MODEL given and no training run at runs/latest; pass a model path "
                         "(SavedModel folder, .keras or .h5), or train one: xedge train --data DIR --out runs/NAME")


def _print_summary(summary: dict, title: str = "conversion") -> None:
    from rich.table import Table

    def mib(n):
        return f"{n / 2**20:.2f} MiB"

    table = Table(title=title, show_header=False)
    table.add_row("mode", summary["mode"])
    table.add_row("output", summary["output"])
    table.add_row("size", f"{mib(summary['source_bytes'])} -> {mib(summary['output_bytes'])}")
    table.add_row("ops int / float", f"{summary['int_ops']} / {summary['float_ops']}")
    if summary.get("calibration_samples"):
        table.add_row("calibration images", str(summary["calibration_samples"]))
    table.add_row("time", f"{summary['seconds']:.1f} s")
    _console(stderr=False).print(table)


MODE_FLAGS = [
    ("--float", "float", "float32 model (no quantization)"),
    ("--dynamic", "dynamic", "dynamic-range: int8 weights, float activations"),
    ("--fp16", "fp16", "float16 weights"),
    ("--int8", "int8", "full integer: int8 weights and activations, int8 input/output (needs --calib)"),
    ("--int16x8", "int16x8", "int16 activations, int8 weights (needs --calib)"),
]


def mode_options(fn):
    for flag, value, help_text in reversed(MODE_FLAGS):
        fn = click.option(flag, "mode", flag_value=value, help=help_text)(fn)
    return fn


@click.command("convert", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, type=click.Path())
@mode_options
@click.option("--calib", type=click.Path(), help="Folder of representative images (flat or one subfolder per "
              "class; images and .npy arrays), for --int8 and --int16x8.")
@click.option("--calib-size", default=200, show_default=True, type=click.IntRange(1),
              help="How many calibration images to use (class-stratified sample).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the calibration sample.")
@click.option("--float-io", is_flag=True, help="Keep float32 input and output on an integer model.")
@click.option("--allow-float-fallback", is_flag=True,
              help="Accept --int8 models where some CONV/DEPTHWISE/FULLY_CONNECTED ops stay float.")
@click.option("--per-tensor", is_flag=True, help="Per-tensor weight scales instead of per-channel.")
@click.option("--out", "out", type=click.Path(), help="Output .tflite (default: beside MODEL, MODEL_<mode>.tflite).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--trust-model-code", is_flag=True,
              help="Allow Lambda layers and other code inside MODEL to run when it loads (unsafe).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a table.")
@guarded
def convert_command(model, mode, calib, calib_size, seed, float_io, allow_float_fallback, per_tensor, out, force,
                    trust_model_code, as_json):
    """Convert MODEL (SavedModel folder, Keras 3 .keras, tf_keras .keras/.h5) to TFLite.

    Without MODEL, the latest training run (runs/latest/model.keras) is used.
    The .tflite and its manifest (MODEL_<mode>.manifest.json: hashes, versions,
    settings, calibration files, ops left in float) are written atomically.

    \b
    Example:
      convert --int8 --calib ./samples
      convert runs/digits/model.keras --fp16 --out model_fp16.tflite
    """
    from pipeline.errors import CalibrationError
    from pipeline.export import CALIBRATED_MODES, ConvertSettings, export_tflite
    from pipeline.modelio import load_source
    from pipeline.preprocessing import PreprocessSpec

    if mode is None:
        raise click.UsageError("choose a mode: --float, --dynamic, --fp16, --int8 or --int16x8")
    if calib and mode not in CALIBRATED_MODES:
        raise click.UsageError(f"--calib is only used by --int8 and --int16x8, not --{mode}")
    if float_io and mode not in CALIBRATED_MODES:
        raise click.UsageError("--float-io only applies to --int8 and --int16x8")
    path = _resolve_model(model)
    settings = ConvertSettings(mode=mode, float_io=float_io, allow_float_fallback=allow_float_fallback,
                               per_channel=not per_tensor, trust_model_code=trust_model_code)
    from pipeline.artifacts import check_writable
    from pipeline.export import default_output

    check_writable(Path(out) if out else default_output(path, mode), force=force)
    source = load_source(path, trust_code=trust_model_code)
    representative = None
    if calib:
        from calibrate.dataset import build_calibration_set

        with Bar("reading calibration images") as bar:
            representative = build_calibration_set(calib, PreprocessSpec(size=source.input_size),
                                                   size=calib_size, seed=seed, progress=bar)
        if representative.skipped:
            click.echo(f"skipped {len(representative.skipped)} calibration files (listed in the manifest), e.g. "
                       f"{representative.skipped[0].path}: {representative.skipped[0].reason}", err=True)
    elif mode in CALIBRATED_MODES and not _is_qat(source):
        raise CalibrationError(f"--{mode} needs --calib DIR: a folder of representative images "
                               "(a few hundred from the training distribution)")
    with Bar("calibrating") as bar:
        result = export_tflite(path, settings, out=out, representative=representative, force=force,
                               progress=bar, source=source)
    if as_json:
        import json

        click.echo(json.dumps({**result.summary, "manifest": str(result.manifest_path)}))
    else:
        _print_summary(result.summary)
        click.echo(f"wrote {result.path} and {result.manifest_path}")


def _is_qat(source) -> bool:
    from pipeline.export import is_qat_model

    return is_qat_model(source)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="xception-edge")
def cli():
    """xception-edge: train Xception, convert it to TFLite, validate the drift, bench on the device."""


cli.add_command(convert_command)


@cli.command("demo")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(), help="Folder for data, run and models.")
@click.option("--epochs", default=6, show_default=True, type=click.IntRange(1), help="Training epochs.")
@guarded
def demo_command(out, epochs):
    """Run the whole pipeline on scikit-learn's bundled digits (no download).

    Writes the digits as an image folder, trains a small Xception on the CPU
    (or GPU), converts it to float32 and calibrated int8 TFLite, and prints a
    summary of each step.
    """
    from calibrate.dataset import build_calibration_set
    from pipeline.demo import run_demo
    from pipeline.train import TrainConfig

    console = _console(stderr=False)

    def on_epoch(epoch, row):
        console.print(f"  epoch {epoch}/{epochs}: loss {row['loss']:.3f}  accuracy {row['accuracy']:.3f}  "
                      f"val_accuracy {row['val_accuracy']:.3f}  ({row['images_per_s']:.0f} images/s)")

    cfg = TrainConfig(epochs=epochs, input_size=71, width=0.25, middle_blocks=2)
    with Bar("calibrating") as bar:
        result = run_demo(out, build_calibration=lambda d, spec: build_calibration_set(d, spec, size=100),
                          say=lambda s: console.print(f"[bold]>[/bold] {s}"), on_epoch=on_epoch,
                          on_calibration=bar, config=cfg)
    for mode, exported in result.exports.items():
        _print_summary(exported.summary, title=f"demo: {mode}")
    console.print(f"validation accuracy of the float model: {result.val_accuracy:.3f}")
    console.print("steps: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.steps))


def main():
    """Entry point of the ``convert`` console script."""
    convert_command(prog_name="convert")


if __name__ == "__main__":
    cli(prog_name="xedge")

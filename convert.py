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
from typing import TYPE_CHECKING

import click

from pipeline.conversion.settings import Calibrator, Fallback, Mode, Ranges, Rounding
from pipeline.core.conventions import InputConvention

if TYPE_CHECKING:  # rich is imported when a command runs, not for --help
    from rich.progress import TaskID

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _console(stderr: bool = True):
    from rich.console import Console

    if stderr:
        return Console(file=_user_stderr(), highlight=False)
    return Console(highlight=False)


@functools.cache
def _user_stderr():
    """The user's stderr as it was before any library call, on a file descriptor of its own.

    While the converter runs, the library points fd 2 at a temporary file
    (``pipeline.core.tf_logs.native_stderr_captured``) to keep TensorFlow's
    native log for its error messages; the calibration progress bar is drawn
    during exactly that time, so it writes to a duplicate of fd 2 taken first.
    """
    try:
        if sys.stderr is None or sys.stderr.fileno() != 2:
            return sys.stderr  # already redirected in Python (click's CliRunner): write where it points
        sys.stderr.flush()
        return os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8", errors="replace")
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError and a ValueError
        return sys.stderr


# How the CLI words each library Remedy: the only place that names the flags that fix an error.
REMEDY_FLAGS = {
    "force": "pass --force to overwrite, or --out to choose another",
    "trust-code": "pass --trust-model-code only if you trust whoever made this file",
    "calibration-images": "pass --calib DIR (a folder of representative images)",
    "allow-float-fallback": "pass --allow-float-fallback to accept a partly float model",
    "signed-unit-input": "convert with --input-convention signed-unit",
    "labels": "pass --labels FILE (class names in output order)",
    "another-output": "choose another --out",
    "int8-pixels": "convert with --int8 (uint8 pixel input, the default) or --float-io",
    "parity-target": "choose at least one target: --device NAME (repeatable) and/or --mediapipe",
    "mode": "choose a mode: --float, --dynamic, --fp16, --int8 or --int16x8",
    "model-path": "pass a model path (SavedModel folder, .keras or .h5), or train one: "
                  "xedge train --data DIR --out runs/NAME",
    "same-architecture": "use a file saved from an Xception of the same --width and --middle-blocks",
    "model-files": "name the model files (xedge latency-test --device NAME MODEL...)",
}

# The settings whose flag is not their name with dashes.
SETTING_FLAGS = {"eval_dir": "--eval", "max_drop_pp": "--max-drop", "per_channel": "--per-tensor",
                 "mode": "--float, --dynamic, --fp16, --int8 or --int16x8"}


def describe(exc) -> str:
    """The one-line message for a library error: what is wrong, then the flag that fixes it."""
    text = str(exc)
    if exc.setting:
        text += f" ({SETTING_FLAGS.get(exc.setting) or '--' + exc.setting.replace('_', '-')})"
    if exc.remedy:
        text += f"; {REMEDY_FLAGS[exc.remedy]}"
    return text


def guarded(fn=None, *, tensorflow: bool = True):
    """Turn library errors into ``error: ...`` and their exit code.

    Commands that use TensorFlow import it here, with its start-up log
    captured, so the user sees the tool's output and not TensorFlow's
    (``convert`` imports it itself: quantizing a float .tflite needs none).
    """
    if fn is None:
        return functools.partial(guarded, tensorflow=tensorflow)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.core.errors import SettingsError, XedgeError
        from pipeline.core.interrupts import exit_code, terminate_as_interrupt
        from pipeline.core.tf_logs import import_tensorflow_quietly, quiet_tensorflow

        quiet_tensorflow()
        try:
            with terminate_as_interrupt():  # SIGTERM unwinds like Ctrl-C: temporary files and children cleaned up
                if tensorflow:
                    import_tensorflow_quietly()
                return fn(*args, **kwargs)
        except SettingsError as exc:  # settings that cannot go together: shown with the command's usage line
            raise click.UsageError(describe(exc), ctx=click.get_current_context(silent=True)) from None
        except XedgeError as exc:
            click.echo(f"error: {describe(exc)}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            code = exit_code(exc)
            click.echo(f"{'interrupted' if code == EXIT_INTERRUPTED else 'terminated (SIGTERM)'}; no partial "
                       "output was left behind", err=True)
            sys.exit(code)

    return wrapper


class Bar:
    """A rich progress bar driven by the library's (done, total) callbacks."""

    def __init__(self, description: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        # redirect_stderr=False: Python writes to sys.stderr during the bar stay where the library points fd 2.
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), console=_console(), transient=True, redirect_stderr=False)
        self._description = description
        self._shown = description
        self._task: TaskID | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._task is not None:
            self._progress.stop()
        return False

    def __call__(self, done: int, total: int, step: str | None = None) -> None:
        """``step``: a later step of the same work under its own name (the int8 methods after the calibration);
        the bar starts again under that name."""
        if not self._progress.console.is_terminal:
            return  # no bar in logs and pipes: it would only leave blank lines
        description = step or self._description
        if self._task is None:
            self._progress.start()
        if self._task is None or description != self._shown:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(description, total=total)
            self._shown = description
        self._progress.update(self._task, completed=done, total=total)


def _print_summary(summary: dict, title: str = "conversion") -> None:
    from rich.table import Table

    from pipeline.conversion.summary import summary_rows

    table = Table(title=title, show_header=False)
    for name, value in summary_rows(summary):
        table.add_row(name, value)
    _console(stderr=False).print(table)
    outside = summary.get("xnnpack_outside") or []
    if summary.get("xnnpack_refused"):
        click.echo(f"warning: LiteRT's XNNPACK delegate refuses this model ({summary['xnnpack_refused']}): it runs "
                   "on the slow builtin kernels only, and runtimes that apply XNNPACK by default fail to load it. "
                   "Activations with extreme ranges are the usual cause: keep those layers in float "
                   "(--max-drop PP --eval DIR), or use --int16x8.", err=True)
    elif [o["op"] for o in outside] == ["QUANTIZE"] and summary.get("input_convention") == "pixels":
        click.echo("note: the uint8 -> int8 QUANTIZE of the pixel input runs outside XNNPACK (a copy of the input; "
                   "--input-convention pixels-int8 takes int8 p - 128 instead).", err=True)
    elif outside:
        click.echo(f"note: {len(outside)} ops run outside XNNPACK (slower); first: {outside[0]['op']} "
                   f"({outside[0]['output']}): {outside[0]['reason']}. All are listed in the manifest.", err=True)


MODE_FLAGS = [
    ("--float", Mode.FLOAT, "float32 model (no quantization)"),
    ("--dynamic", Mode.DYNAMIC, "dynamic-range: int8 weights, float activations"),
    ("--fp16", Mode.FP16, "float16 weights"),
    ("--int8", Mode.INT8, "full integer: int8 weights and activations, uint8 pixel input/output (needs --calib)"),
    ("--int16x8", Mode.INT16X8, "int16 activations, int8 weights (needs --calib)"),
]


def choice(members) -> click.Choice:
    """The values of a closed set of the library's, spelled with hyphens (``pixels-int8``)."""
    return click.Choice([getattr(m, "spelled", str(m)) for m in members])


TRUST_HELP = ("Let the model files run code when they load or run (unsafe): Lambda/TFSMLayer layers in Keras files, "
              "TensorFlow ops outside the safe list in a SavedModel.")


def mode_options(fn):
    for flag, value, help_text in reversed(MODE_FLAGS):
        fn = click.option(flag, "mode", flag_value=value, help=help_text)(fn)
    return fn


# Every command that reads a labeled image folder maps its class folders to outputs the same way
# (pipeline.validation.validate.resolve_labels).
labels_option = click.option(
    "--labels", type=click.Path(), metavar="FILE",
    help="labels.json (class names in output order) for the class folders; default: a labels.json beside the "
    "model, else the labels in a .tflite's manifest, else the sorted folder names.")


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
@click.option("--no-optimize", is_flag=True, help="Skip the graph rewrites that keep XNNPACK in one partition "
              "(RELU after a shared residual ADD fused into a second ADD; checked on the calibration images and, "
              "with --max-drop, on the eval images).")
@click.option("--input-convention", "input_convention",
              type=choice(InputConvention), help="What the model's input holds: "
              "pixels (uint8 0..255 for --int8, float32 0..255 for float models; the default where the [-1, 1] "
              "scaling folds exactly into the first convolution), pixels-int8 (int8 p - 128, --int8 only) or "
              "signed-unit (p / 127.5 - 1, Keras Xception's own scaling; the default for --int16x8 and models "
              "that cannot fold).")
@click.option("--calibrator", type=choice(Calibrator), default=Calibrator.FAST.value, show_default=True,
              help="fast: min/max under XNNPACK, one interpreter per core (at most 4); stock: TFLite's own "
              "logging calibrator.")
@click.option("--rounding", type=choice(Rounding), default=Rounding.NEAREST.value, show_default=True,
              help="--int8 weights: rounded to the nearest level, or up or down per weight to minimize each "
              "layer's output error on the calibration images (scales and graph unchanged). With --ranges mse: "
              "the closest to float measured (docs/validation.md), at about 15x the plain calibration time on a "
              "MobileNetV2.")
@click.option("--ranges", type=choice(Ranges), default=Ranges.MINMAX.value, show_default=True,
              help="--int8 activation ranges: the min/max seen on the calibration images, or per tensor the "
              "clipping of least expected quantization error.")
@click.option("--bias-correction/--no-bias-correction", default=None,
              help="--int8: fold each layer's mean output shift on the calibration images into its int32 bias "
              "(only the biases change: same graph, ops and scales). On by default wherever --int8 calibrates "
              "on images; --no-bias-correction leaves the quantizer's biases as they are.")
@click.option("--equalize/--no-equalize", default=False, show_default=True,
              help="--int8: cross-layer equalization before calibration: each pair of weighted layers in a row "
              "(no activation or ReLU between, the first read only by the second) gets its channel ranges balanced "
              "by rescaling, exact in float. Off by default: on the models measured it brought int8 no closer "
              "to float (docs/validation.md).")
@click.option("--out", "out", type=click.Path(), help="Output .tflite (default: beside MODEL, MODEL_<mode>.tflite).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--trust-model-code", is_flag=True, help=TRUST_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a table.")
@click.option("--max-drop", type=click.FloatRange(min=0), metavar="PP", help="Accuracy budget: top-1 drop in "
              "percentage points on --eval; layers are kept in float until it holds (exit 3 if it cannot).")
@click.option("--eval", "eval_dir", type=click.Path(), help="Labeled images (one subfolder per class) for --max-drop; "
              "every third image of each class is held out of the search and judges its result (when every class "
              "has at least 3).")
@click.option("--eval-limit", type=click.IntRange(1), help="Use at most N --eval images (round-robin over classes).")
@labels_option
@click.option("--max-float-layers", default=8, show_default=True, type=click.IntRange(0),
              help="With --max-drop: at most this many layers kept in float.")
@click.option("--fallback", type=choice(Fallback), default=Fallback.FLOAT.value, show_default=True,
              help="With --int8 --max-drop: keep the worst layers in float, or in int16 (16-bit activations, "
              "spliced from an int16x8 conversion).")
@guarded(tensorflow=False)
def convert_command(model, mode, calib, calib_size, seed, float_io, allow_float_fallback, per_tensor, no_optimize,
                    input_convention, calibrator, rounding, ranges, bias_correction, equalize, out, force,
                    trust_model_code, as_json, max_drop, eval_dir, eval_limit, labels, max_float_layers, fallback):
    """Convert MODEL (SavedModel folder, Keras 3 .keras, tf_keras .keras/.h5) to TFLite.

    A float32 .tflite MODEL is quantized directly with --int8 (calibration
    and TensorFlow's quantizer only, as ONNX Runtime's quantize_static does).
    Without MODEL, the latest training run (runs/latest/model.keras) is used.
    The .tflite and its manifest (MODEL_<mode>.manifest.json: hashes, versions,
    settings, calibration files, ops left in float) are written atomically.

    \b
    Example:
      convert --int8 --calib ./samples
      convert runs/digits/model.keras --fp16 --out model_fp16.tflite
      convert model_float.tflite --int8 --calib ./samples
    """
    from pipeline.conversion.export import export_tflite
    from pipeline.conversion.settings import ConvertRequest, ConvertSettings, default_output
    from pipeline.core.artifacts import check_writable
    from pipeline.core.faults import pause
    from pipeline.model.modelio import load_source
    from pipeline.model.train import latest_model

    settings = ConvertSettings(mode=mode, float_io=float_io, allow_float_fallback=allow_float_fallback,
                               per_channel=not per_tensor, trust_model_code=trust_model_code,
                               optimize=not no_optimize, calibrator=calibrator, fallback=fallback,
                               rounding=rounding, bias_correction=bias_correction, ranges=ranges, equalize=equalize,
                               input_convention=input_convention)
    request = ConvertRequest(settings, calib=calib, max_drop_pp=max_drop, eval_dir=eval_dir, labels=labels,
                             max_float_layers=max_float_layers)
    path = Path(model) if model else latest_model()
    if request.needs_tensorflow(path):
        from pipeline.core.tf_logs import import_tensorflow_quietly

        import_tensorflow_quietly()
    check_writable(Path(out) if out else default_output(path, settings.mode), force=force)
    source = load_source(path, trust_code=trust_model_code)
    pause("source-loaded")  # a .tflite source's sandboxed probe is running here (tests signal us at this point)
    representative = _calibration_set(calib, calib_size, seed, source.input_size)
    if request.budgeted:
        return _convert_within_budget(path, request, representative, source, eval_limit, out, force, as_json)
    with Bar("calibrating") as bar:
        result = export_tflite(path, settings, out=out, representative=representative, force=force,
                               progress=bar, source=source)
    if as_json:
        import json

        click.echo(json.dumps({**result.summary, "manifest": str(result.manifest_path)}))
    else:
        _print_summary(result.summary)
        click.echo(f"wrote {result.path} and {result.manifest_path}")


def _calibration_set(calib, calib_size, seed, input_size):
    """The representative images from --calib (skipped files reported), or None without --calib."""
    from calibrate.dataset import build_calibration_set
    from pipeline.core.preprocessing import PreprocessSpec

    if not calib:
        return None
    with Bar("reading calibration images") as bar:
        representative = build_calibration_set(calib, PreprocessSpec(size=input_size),
                                               size=calib_size, seed=seed, progress=bar)
    if representative.skipped:
        click.echo(f"skipped {len(representative.skipped)} calibration files (listed in the manifest), e.g. "
                   f"{representative.skipped[0].path}: {representative.skipped[0].reason}", err=True)
    return representative


def _fallback_latency(before: Path, after: Path) -> dict:
    """A quick local A/B bench: the latency cost of the layers kept in float."""
    from devices.bench import compare

    result = compare(before, after, runs=30, warmup=3, reference=False)
    a, b = (r["latency_ms"]["p50"] for r in result["results"])
    return {"device": "local", "runs": 30, "all_quantized_p50_ms": a, "with_fallback_p50_ms": b,
            "ratio_p50": result["compare"]["ratio_b_over_a"]["p50"]}


def _convert_within_budget(path, request, representative, source, eval_limit, out, force, as_json):
    from pipeline.conversion.summary import fallback_lines, fallback_summary
    from pipeline.validation.accuracy_budget import BudgetSettings, convert_within_budget

    say = (lambda s: None) if as_json else (lambda s: click.echo(s, err=True))
    budget = BudgetSettings(request.max_drop_pp, request.eval_dir, labels=request.labels, eval_limit=eval_limit,
                            max_float_layers=request.max_float_layers, latency=_fallback_latency)
    result = convert_within_budget(path, request.settings, budget, representative=representative, out=out,
                                   force=force, source=source, say=say)
    if as_json:
        import json

        click.echo(json.dumps({**result.export.summary, "manifest": str(result.export.manifest_path),
                               **fallback_summary(result.record)}))
        return
    _print_summary(result.export.summary)
    for line in fallback_lines(result.record):
        click.echo(line)
    click.echo(f"wrote {result.export.path} and {result.export.manifest_path}")


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
    from pipeline.model.train import TrainConfig

    console = _console(stderr=False)

    def on_epoch(epoch, row):
        console.print(f"  epoch {epoch}/{epochs}: loss {row['loss']:.3f}  accuracy {row['accuracy']:.3f}  "
                      f"val_accuracy {row['val_accuracy']:.3f}  ({row['images_per_s']:.0f} images/s)")

    cfg = TrainConfig(epochs=epochs, input_size=71, width=0.25, middle_blocks=2)
    with Bar("calibrating") as bar:
        result = run_demo(out, build_calibration=lambda d, spec: build_calibration_set(d, spec, size=100),
                          say=lambda s: console.print(f"[bold]>[/bold] {s}"), on_epoch=on_epoch,
                          on_calibration=bar, config=cfg, bench=_demo_bench)
    for mode, exported in result.exports.items():
        _print_summary(exported.summary, title=f"demo: {mode}")
    console.print(f"validation accuracy of the float model: {result.val_accuracy:.3f}")
    if result.validation is not None:
        report = result.validation.report
        console.print(f"int8 drift: top-1 {report['top1_quant']:.3f} vs float {report['top1_float']:.3f} "
                      f"({report['top1_drop_pp']:+.2f} pp), agreement {report['agreement']:.3f}; "
                      f"report: {result.validation.paths['html']}")
    if result.bench is not None:
        from devices.tables import bench_table, compare_table, describe_machine

        console.print(bench_table(result.bench["results"], title="demo: latency on this machine (ms)"))
        console.print(describe_machine(result.bench["results"][0]))
        console.print(compare_table(result.bench))
        for note in result.bench["notes"]:
            console.print(f"[yellow]note:[/yellow] {note}")
    console.print("steps: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.steps))


def _demo_bench(models: dict) -> dict:
    from devices.bench import compare

    return compare(models["float"], models["int8"], runs=30, warmup=3)


@cli.command("validate")
@click.argument("reference", type=click.Path())
@click.argument("candidate", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="Images: one subfolder per class (or flat: "
              "agreement only).")
@click.option("--report", "report_dir", required=True, type=click.Path(), help="Folder for report.json/.md/.html.")
@labels_option
@click.option("--max-top1-drop", type=click.FloatRange(min=0), metavar="PP", help="Budget: top-1 drop in percentage points.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), metavar="F", help="Budget: top-1 agreement (fraction, 0..1).")
@click.option("--max-kl", type=click.FloatRange(min=0), metavar="X", help="Budget: mean KL(reference || candidate) in nats.")
@click.option("--limit", type=click.IntRange(1), help="Use at most N images (taken round-robin over classes).")
@click.option("--layer-samples", default=16, show_default=True, type=click.IntRange(0),
              help="Images for the per-layer error of an int8 candidate (0: skip).")
@click.option("--trust-model-code", is_flag=True, help=TRUST_HELP)
@guarded
def validate_command(reference, candidate, data, report_dir, labels, max_top1_drop, min_agreement, max_kl, limit,
                     layer_samples, trust_model_code):
    """Measure the accuracy drift of CANDIDATE against REFERENCE on real images.

    Exit 0 within budgets, 3 when a budget is exceeded, 2 for errors.

    \b
    Example:
      xedge validate runs/latest/model.keras model_int8.tflite --data ./val --report drift --max-top1-drop 1
    """
    from pipeline.validation.report_md import budget_lines, summary_rows
    from pipeline.validation.validate import Budgets, validate
    from rich.table import Table

    budgets = Budgets(max_top1_drop, min_agreement, max_kl)
    with Bar("validating") as bar:
        result = validate(reference, candidate, data, report_dir, labels=labels, budgets=budgets, limit=limit,
                          layer_samples=layer_samples, trust_code=trust_model_code, progress=bar)
    table = Table(title="drift", show_header=False)
    for key, value in summary_rows(result.report):
        table.add_row(key, value)
    console = _console(stderr=False)
    console.print(table)
    for line in budget_lines(result.report):
        console.print(line)
    skipped = result.report["data"]["skipped"]
    if skipped:
        click.echo(f"skipped {len(skipped)} files (listed in report.json), e.g. {skipped[0]['path']}: "
                   f"{skipped[0]['reason']}", err=True)
    click.echo(f"report: {result.paths['html']} (also report.json, report.md)")
    result.raise_for_budgets()


def _parity_targets(devices, mediapipe) -> list:
    """Target factories: the library runs them, the CLI says which (devices/ is not the library's to import)."""
    from devices.parity_target import device_target

    factories = [device_target(name) for name in devices]
    if mediapipe:
        from pipeline.validation.mediapipe_client import MediapipeTarget

        factories.append(MediapipeTarget)
    return factories


@cli.command("parity")
@click.argument("model", type=click.Path())
@click.option("--eval", "eval_dir", required=True, type=click.Path(), help="Images (one subfolder per class, or "
              "flat); each is decoded, centre-cropped and resized to the model's input size once, and every runtime "
              "gets those same pixels.")
@click.option("--device", "devices", multiple=True, metavar="NAME", help="A device profile (name or .toml path) "
              "as a target: its runner, through its transport. Repeatable.")
@click.option("--mediapipe", is_flag=True, help="MediaPipe Tasks' ImageClassifier (this machine) as a target.")
@labels_option
@click.option("--limit", type=click.IntRange(1), help="Use at most N images (taken round-robin over classes).")
@click.option("--max-quanta", type=click.FloatRange(min=0), metavar="Q", help="Also fail when a quantized output "
              "differs by more than Q quanta on an image (default: only a changed top-1 fails).")
@click.option("--max-abs", type=click.FloatRange(min=0), metavar="X", help="The same for a float output: fail "
              "above an absolute difference X.")
@click.option("--report", "report_path", type=click.Path(), help="Write the report: FILE.json, FILE.md, or a folder "
              "(parity.json and parity.md).")
@guarded(tensorflow=False)
def parity_command(model, eval_dir, devices, mediapipe, labels, limit, max_quanta, max_abs, report_path):
    """Run MODEL (.tflite) here and on each target on the same images; compare top-1 and outputs image by image.

    Exit 0 when every target agrees, 3 when a top-1 differs (or a difference is over --max-quanta/--max-abs),
    2 for errors.

    \b
    Example:
      xedge parity model_float.tflite --eval ./val --device raspberry-pi --mediapipe --report parity
    """
    from rich.table import Table

    from pipeline.validation.parity import Tolerance, run_parity
    from pipeline.validation.parity_report import (SUMMARY_COLUMNS, decoding_text, inputs_line, near_ties_text,
                                                   summary_rows, write_report)

    with Bar("decoding, then running each runtime") as bar:
        result = run_parity(model, eval_dir, _parity_targets(devices, mediapipe), labels=labels, limit=limit,
                            tolerance=Tolerance(max_quanta, max_abs), progress=bar)
    console = _console(stderr=False)
    if not console.is_terminal:
        console.width = 200  # a log or pipe: keep rows on one line
    console.print(inputs_line(result.report), soft_wrap=True)
    table = Table(title=f"parity of {model} with {result.report['reference']['runtime']} on this machine")
    for column in SUMMARY_COLUMNS:
        table.add_column(column)
    for row in summary_rows(result.report):
        table.add_row(*row)
    console.print(table)
    for line in result.failures:
        console.print(f"FAIL {line}", soft_wrap=True)
    for target in result.report["targets"]:
        if target["top1_mismatches"]:
            console.print(f"{target['name']}: {near_ties_text(target)}", soft_wrap=True)
        if decoding_text(target):
            console.print(f"{target['name']} {decoding_text(target)}", soft_wrap=True)
    written = write_report(result.report, report_path) if report_path else []
    if written:
        click.echo("wrote " + ", ".join(map(str, written)))
    result.raise_for_parity(str(written[0]) if written else None)


@cli.command("diff")
@click.argument("reports", nargs=-1, required=True, type=click.Path())
@click.option("--html", "html_out", type=click.Path(), help="Also write the comparison as an HTML page.")
@click.option("--md", "md_out", type=click.Path(), help="Also write the comparison as Markdown.")
@guarded(tensorflow=False)
def diff_command(reports, html_out, md_out):
    """Show several validation reports (report.json) side by side."""
    from pipeline.validation.diff import COLUMNS, compare, write_diff
    from rich.table import Table

    comparison = compare(list(reports))
    table = Table(title="validation reports")
    for column in COLUMNS:
        table.add_column(column)
    for row in comparison.cells():
        table.add_row(*row)
    console = _console(stderr=False)
    if not console.is_terminal:
        console.width = 200  # a log or pipe: keep rows on one line
    console.print(table)
    for warning in comparison.warnings:
        click.echo(f"warning: {warning}", err=True)
    for path in write_diff(comparison, html_path=html_out, md_path=md_out):
        click.echo(f"wrote {path}")


def _sweep_bench(path: Path) -> dict:
    from devices.bench import bench

    latency = bench([path], runs=30, warmup=3)["latency_ms"]
    return {"p50_ms": latency["p50"], "p90_ms": latency["p90"]}


@cli.command("sweep")
@click.argument("model", type=click.Path())
@click.option("--calib", required=True, type=click.Path(), help="Calibration images (for the int8/int16x8 modes).")
@click.option("--calib-size", default=200, show_default=True, type=click.IntRange(1))
@click.option("--eval", "eval_dir", required=True, type=click.Path(), help="Labeled images: one subfolder per class.")
@click.option("--eval-limit", type=click.IntRange(1), help="Use at most N eval images (round-robin over classes).")
@labels_option
@click.option("--out", required=True, type=click.Path(),
              help="Folder for the models, reports and sweep.json/.md/.html.")
@click.option("--max-drop", default=1.0, show_default=True, type=click.FloatRange(min=0), metavar="PP",
              help="Budget of the int8-fallback mode (top-1 drop, percentage points).")
@click.option("--max-float-layers", default=8, show_default=True, type=click.IntRange(0))
@click.option("--modes", help="Comma-separated list of: float, dynamic, fp16, int8, int8-per-tensor, "
              "int8-fallback, int16x8 (the default: all of these; int8 with its default bias correction), int8-plain "
              "(no bias correction), int8-bias-correction, int8-learned-rounding, int8-learned-bc (learned "
              "rounding then bias correction), int8-mse-ranges (the last three name every method they use), int8-equalize "
              "(--equalize, then the defaults).")
@click.option("--no-bench", is_flag=True, help="Skip the local latency bench.")
@click.option("--force", is_flag=True, help="Overwrite models from an earlier sweep in --out.")
@click.option("--trust-model-code", is_flag=True, help=TRUST_HELP)
@guarded
def sweep_command(model, calib, calib_size, eval_dir, eval_limit, labels, out, max_drop, max_float_layers, modes,
                  no_bench, force, trust_model_code):
    """Convert MODEL in every mode, validate and bench each, and write one comparison table.

    \b
    Example:
      xedge sweep runs/latest/model.keras --calib ./samples --eval ./val --out sweep
    """
    from rich.table import Table

    from calibrate.dataset import build_calibration_set
    from pipeline.model.modelio import load_source
    from pipeline.core.preprocessing import PreprocessSpec
    from pipeline.validation.sweep import DEFAULT_MODES, run_sweep
    from pipeline.validation.sweep_report import COLUMNS, table_rows

    size = load_source(Path(model), trust_code=trust_model_code).input_size
    with Bar("reading calibration images") as bar:
        representative = build_calibration_set(calib, PreprocessSpec(size=size), size=calib_size, progress=bar)
    chosen = [m.strip() for m in modes.split(",") if m.strip()] if modes else list(DEFAULT_MODES)
    result = run_sweep(model, representative=representative, eval_dir=eval_dir, out_dir=out, labels=labels,
                       bench=None if no_bench else _sweep_bench, max_drop_pp=max_drop,
                       max_float_layers=max_float_layers, eval_limit=eval_limit, modes=chosen, force=force,
                       say=lambda s: click.echo(s, err=True), trust_model_code=trust_model_code)
    table = Table(title=f"sweep of {model}")
    for column in COLUMNS:
        table.add_column(column)
    for row in table_rows(result.record):
        table.add_row(*row)
    console = _console(stderr=False)
    if not console.is_terminal:
        console.width = 200
    console.print(table)
    click.echo(f"wrote {result.paths['html']} (also sweep.json, sweep.md; per-mode reports in {out}/reports)")


class EpochBars:
    """One rich progress bar per epoch, fed by the library's (epoch, step, steps) callbacks."""

    def __init__(self, epochs: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.epochs = epochs
        self.console = _console(stderr=False)
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), console=self.console, transient=True)
        self._task: TaskID | None = None
        self._epoch: int | None = None

    def __enter__(self):
        if self.console.is_terminal:  # in logs and pipes the per-epoch lines are enough
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self.console.is_terminal:
            self._progress.stop()
        return False

    def batch(self, epoch: int, step: int, steps: int) -> None:
        if not self.console.is_terminal:
            return
        if epoch != self._epoch:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(f"epoch {epoch}/{self.epochs}", total=steps, completed=step - 1)
            self._epoch = epoch
        if self._task is not None:
            self._progress.update(self._task, completed=step)

    def epoch(self, epoch: int, row: dict) -> None:
        self.console.print(f"  epoch {epoch}/{self.epochs}: loss {row['loss']:.3f}  accuracy {row['accuracy']:.3f}  "
                           f"val_accuracy {row['val_accuracy']:.3f}  ({row['images_per_s']:.0f} images/s)")


SWITCH = click.Choice(["auto", "on", "off"])


@cli.command("train")
@click.option("--data", required=True, type=click.Path(), help="Training images: one subfolder per class.")
@click.option("--val", type=click.Path(), help="Validation images (same classes); default: a stratified 10% of --data.")
@click.option("--out", type=click.Path(), help="Run folder (default runs/<UTC time>); runs/latest points to it.")
@click.option("--epochs", default=6, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Per GPU (replica).")
@click.option("--input-size", default=71, show_default=True, type=click.IntRange(71), help="Input side in pixels.")
@click.option("--width", default=0.25, show_default=True, type=float, help="Channel multiplier (1.0 = paper).")
@click.option("--middle-blocks", default=2, show_default=True, type=click.IntRange(0), help="Middle flow blocks (paper: 8).")
@click.option("--weights", type=click.Path(), help="Initial weights (.h5/.weights.h5, e.g. Keras ImageNet Xception).")
@click.option("--freeze", default=0, show_default=True, type=click.IntRange(0), help="Freeze the first N layers.")
@click.option("--optimizer", default="adam", show_default=True, type=click.Choice(["sgd", "rmsprop", "adam"]),
              help="sgd is the paper's ImageNet recipe (0.045, x0.94 every 2 epochs).")
@click.option("--lr", type=float, help="Learning rate per 32 images (scaled with the global batch).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--augment/--no-augment", default=True, show_default=True, help="Random resized crops.")
@click.option("--flip/--no-flip", default=False, show_default=True,
              help="Random horizontal flips (off: they change digits and text).")
@click.option("--min-crop-area", default=0.5, show_default=True, type=float, help="Smallest random crop (area).")
@click.option("--mixed-precision", default="auto", show_default=True, type=SWITCH, help="auto: on for GPUs.")
@click.option("--xla", default="auto", show_default=True, type=SWITCH, help="auto: on for GPUs.")
@click.option("--checkpoint-every", default=200, show_default=True, type=click.IntRange(1),
              help="Steps between mid-epoch checkpoints (also saved at each epoch end and on SIGTERM).")
@guarded
def train_command(data, val, out, epochs, batch_size, input_size, width, middle_blocks, weights, freeze, optimizer,
                  lr, seed, augment, flip, min_crop_area, mixed_precision, xla, checkpoint_every):
    """Train Xception on --data; rerun the same command to resume an interrupted run.

    \b
    Example:
      xedge train --data ./images --out runs/parts --epochs 10
      convert --int8 --calib ./images
    """
    from pipeline.model.train import TrainConfig, default_run_dir, train

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, input_size=input_size, width=width,
                      middle_blocks=middle_blocks, optimizer=optimizer, lr=lr, seed=seed, augment=augment, flip=flip,
                      min_crop_area=min_crop_area, weights=weights, freeze=freeze, mixed_precision=mixed_precision,
                      xla=xla, checkpoint_every=checkpoint_every)
    with EpochBars(epochs) as bars:
        result = train(data, out or default_run_dir(), cfg, val_dir=val, on_epoch=bars.epoch, on_batch=bars.batch)
    m = result.manifest
    click.echo(f"validation accuracy {result.val_accuracy:.4f}; {m['images_per_s']} images/s on "
               f"{m['devices']['kind']} ({m['devices']['replicas']} replicas)")
    if result.wrote:
        click.echo(f"wrote {result.run_dir}/model.keras, labels.json, manifest.json")
    else:
        click.echo("worker finished; the chief worker writes the run folder")


def _threads_list(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        threads = [int(t) for t in value.split(",") if t.strip()]
    except ValueError:
        threads = []
    if not threads:
        raise click.BadParameter("a thread count, or a comma-separated list such as 1,2,4")
    return threads


def _device_inputs(inputs_dir: str | None, model: str):
    """Real samples for the device as uint8 pixels, which the runner feeds each model in its own input convention."""
    if not inputs_dir:
        return None
    from calibrate.dataset import build_calibration_set
    from devices.bench import model_input_shape
    from pipeline.core.preprocessing import PreprocessSpec

    return build_calibration_set(inputs_dir, PreprocessSpec(size=model_input_shape(Path(model))[1]), size=32).pixels()


@cli.command("bench")
@click.argument("model", type=click.Path())
@click.option("--device", help="Device profile name (or .toml path); default: this machine (local).")
@click.option("--runs", type=click.IntRange(1), help="Timed runs (default: the profile's).")
@click.option("--warmup", type=click.IntRange(0), help="Warm-up runs (default: the profile's).")
@click.option("--threads", help="Interpreter threads; a list (1,2,4) sweeps them.")
@click.option("--inputs", type=click.Path(), help="Folder of real images/.npy to feed (default: random inputs "
              "in the model's range).")
@click.option("--outputs", type=click.Path(), help="Folder that receives the device's outputs for --inputs.")
@click.option("--compare", "other", type=click.Path(), help="A second model: runs alternate A/B, per-pair ratio.")
@click.option("--no-xnnpack", is_flag=True, help="Builtin kernels only (no XNNPACK delegate).")
@click.option("--json", "json_out", type=click.Path(), help="Write the full result as JSON to FILE.")
@guarded(tensorflow=False)
def bench_command(model, device, runs, warmup, threads, inputs, outputs, other, no_xnnpack, json_out):
    """Measure MODEL's latency on a device (default: this machine, in a fresh process).

    \b
    Example:
      xedge bench demo-out/model_int8.tflite --compare demo-out/model_float.tflite
      xedge bench model_int8.tflite --device raspberry-pi --threads 1,2,4 --json pi.json
    """
    from devices.bench import bench, compare, sweep
    from devices.profile import load_profile
    from devices.tables import bench_table, compare_table, describe_machine, time_title

    profile, thread_list = load_profile(device), _threads_list(threads)
    if other and thread_list and len(thread_list) > 1:
        raise click.UsageError("--compare takes one thread count")
    common = dict(runs=runs, warmup=warmup, inputs=_device_inputs(inputs, model), xnnpack=not no_xnnpack)
    console = _console(stderr=False)
    if other:
        result = compare(model, other, profile, threads=thread_list[0] if thread_list else None, outputs=outputs,
                         **common)
        shown = result["results"]
    elif thread_list and len(thread_list) > 1:
        shown = sweep(model, thread_list, profile, **common)
        result = {"sweep": shown}
    else:
        result = bench([model], profile, threads=thread_list[0] if thread_list else None, outputs=outputs, **common)
        shown = [result]
    console.print(bench_table(shown, title=time_title(profile)))
    console.print(describe_machine(shown[0]))
    for warning in {w for r in shown for w in r.get("warnings") or ()}:
        console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    if other:
        console.print(compare_table(result))
        for note in result["notes"]:
            console.print(f"[yellow]note:[/yellow] {note}")
    if json_out:
        from pipeline.core.artifacts import atomic_write_json

        click.echo(f"wrote {atomic_write_json(json_out, result)}")


@cli.command("latency-test")
@click.argument("models", nargs=-1, type=click.Path())
@click.option("--device", required=True, help="Device profile (name or .toml path) holding the budgets.")
@click.option("--runs", type=click.IntRange(1), help="Timed runs per model (default: the profile's).")
@click.option("--warmup", type=click.IntRange(0), help="Warm-up runs (default: the profile's).")
@click.option("--out", default="latency-test", show_default=True, type=click.Path(),
              help="Folder for junit.xml and summary.json.")
@guarded(tensorflow=False)
def latency_test_command(models, device, runs, warmup, out):
    """Bench every MODEL that has a budget in the device profile; exit 3 if a p50/p90 budget is exceeded.

    Without MODEL, each budget's `path` in the profile is used.

    \b
    Example:
      xedge latency-test --device raspberry-pi demo-out/model_int8.tflite demo-out/model_float.tflite
    """
    from devices.latency import run_latency_tests, write_report
    from devices.profile import load_profile
    from devices.tables import latency_table
    from pipeline.core.errors import BudgetExceeded

    with Bar("benching") as bar:
        report = run_latency_tests(load_profile(device), list(models) or None, runs=runs, warmup=warmup,
                                   progress=bar)
    console = _console(stderr=False)
    console.print(latency_table(report))
    for path in report.unbudgeted:
        click.echo(f"no budget for {path} in profile {report.device}: not tested")
    junit, summary = write_report(report, out)
    click.echo(f"wrote {junit} and {summary}")
    if report.failed:
        raise BudgetExceeded(f"latency test on {report.device} failed: {report.failure_message()}")


@cli.command("qat")
@click.argument("model", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="Training images: one subfolder per class.")
@click.option("--val", type=click.Path(), help="Validation images; default: a stratified 10% of --data.")
@click.option("--out", type=click.Path(), help="Run folder (default runs/<UTC time>); runs/latest points to it.")
@click.option("--epochs", default=1, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--lr", type=float, help="Learning rate per 32 images (default 1e-4).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--augment/--no-augment", default=True, show_default=True, help="Random resized crops.")
@click.option("--flip/--no-flip", default=False, show_default=True, help="Random horizontal flips.")
@click.option("--trust-model-code", is_flag=True, help=TRUST_HELP)
@guarded
def qat_command(model, data, val, out, epochs, batch_size, lr, seed, augment, flip, trust_model_code):
    """Fine-tune MODEL (a model.keras from xedge train) quantization-aware.

    The run folder holds model.h5 (a tf_keras QAT model), labels.json and
    manifest.json; `convert --int8` turns it into a full-integer model without
    calibration images.

    \b
    Example:
      xedge qat runs/parts/model.keras --data ./images --out runs/parts-qat
      convert --int8
    """
    from pipeline.model.qat import QatConfig, qat
    from pipeline.model.train import default_run_dir

    cfg = QatConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, augment=augment, flip=flip)
    with EpochBars(epochs) as bars:
        result = qat(model, data, out or default_run_dir(), cfg, val_dir=val, on_epoch=bars.epoch,
                     on_batch=bars.batch, trust_code=trust_model_code)
    click.echo(f"validation accuracy (fake-quantized) {result.val_accuracy:.4f}")
    click.echo(f"wrote {result.run_dir}/model.h5, labels.json, manifest.json")


def main():
    """Entry point of the ``convert`` console script: the command, then an exit without Python's teardown."""
    code: int | str | None
    try:
        convert_command(prog_name="convert")  # click's standalone mode always ends in SystemExit
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is not None and not isinstance(code, int):
        click.echo(str(code), err=True)
        code = 1
    exit_without_teardown(code or 0)


def exit_without_teardown(code: int) -> None:
    """End the process once its exit handlers have run, skipping the teardown of the objects it still holds.

    After a conversion the process holds TensorFlow and a model's worth of buffers; their teardown writes
    nothing (the .tflite and its manifest are already written atomically and fsynced) and took 3.2 to 3.7 s
    after a 26 to 37 s Xception-299 float conversion, against 0.2 to 0.6 s with ``os._exit`` (the time from
    the "wrote" line to the end of the process, 3 runs each; 2 shared cores of an Intel Xeon, TensorFlow
    2.21; bench/teardown.py). The exit handlers do run, since they clean
    up: TensorFlow's autograph sources, logging, and sandboxed probes nobody waited for (their
    ``weakref.finalize`` registers with ``atexit``). The standard library offers no public call that runs
    them, hence ``atexit._run_exitfuncs``.
    """
    import atexit

    atexit._run_exitfuncs()  # noqa: SLF001
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    cli(prog_name="xedge")

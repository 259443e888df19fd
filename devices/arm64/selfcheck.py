"""The emulated board checks itself before it serves: LiteRT's builtin kernels there against this machine's, exactly.

Integer kernels compute the same integers on every ISA, so an int8 model run
without XNNPACK must give the same output bytes under qemu on every emulated
core as LiteRT 2.3 gives here; any difference means the emulator or the
unpacked userland is broken, and no figure from the board could be trusted.
The model is a small convolutional net with seeded random weights whose
output is its logits: an untrained network's softmax is flat (every output
the same quantum) and would hide a wrong kernel. Every runtime's venv also
has to run the model and report an aarch64 machine. ``make arm64-board``
writes the stamp that lets the launcher serve only when this exits 0.

    python -m devices.arm64.selfcheck BOARD_DIR
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from devices.local import clean_env
from devices.transport_base import RUNNER, parse_runner_output
from pipeline.core.artifacts import atomic_write_json
from pipeline.core.errors import DeviceError
from pipeline.core.tf_logs import import_tensorflow_quietly, native_stderr_captured

LAUNCHER = Path(__file__).resolve().parent / "board"
CORES = ("cortex-a53", "cortex-a72", "cortex-a76")
REFERENCE_RUNTIME = "ai-edge-litert-2.3"  # the same LiteRT as this machine's venv
RUNTIMES = (REFERENCE_RUNTIME, "ai-edge-litert-1.4", "tflite-runtime-2.14")
SIZE, IMAGES = 32, 8


@dataclass(frozen=True)
class BoardRun:
    runtime: str
    core: str
    version: str | None
    machine: str | None
    differing_outputs: int        # outputs whose integer differs from this machine's (builtin kernels)
    must_match: bool              # the reference runtime must match exactly on every core

    @property
    def passed(self) -> bool:
        return self.machine == "aarch64" and (self.differing_outputs == 0 or not self.must_match)


def check_model(path: Path) -> Path:
    """A seeded random conv net (conv, depthwise, 1x1 conv, residual add, max pooling, dense logits), full int8."""
    tf = import_tensorflow_quietly()
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    inputs = tf.keras.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(16, 3, strides=2, activation="relu")(layers.Rescaling(1 / 127.5, offset=-1)(inputs))
    y = layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = layers.Add()([x, layers.Conv2D(16, 1)(y)])
    x = layers.Flatten()(layers.MaxPooling2D()(x))
    model = tf.keras.Model(inputs, layers.Dense(10)(x))
    rng = np.random.default_rng(0)

    def representative():
        for _ in range(16):
            yield [rng.uniform(0, 255, (1, SIZE, SIZE, 3)).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    with contextlib.redirect_stdout(io.StringIO()), native_stderr_captured(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter's notes, printed on every conversion
        path.write_bytes(converter.convert())
    return path


def run_runner(prefix: list[str], model: Path, inputs: Path, outputs: Path) -> tuple[dict, np.ndarray]:
    """The runner with reference kernels, every input's raw output saved; (its JSON, the outputs)."""
    cmd = [*prefix, "-I", str(RUNNER), str(model), "--runs", "1", "--warmup", "0", "--reference-kernels",
           "--inputs", str(inputs), "--outputs", str(outputs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), stdin=subprocess.DEVNULL,
                          timeout=300)
    result = parse_runner_output(proc, " ".join(prefix[:4]))
    return result, np.load(outputs / f"{model.stem}_output0.npy")


def check(board: Path, work: Path) -> list[BoardRun]:
    model = check_model(work / "check.tflite")
    inputs = work / "inputs.npy"
    # float32 pixels: the model's own input values, which the runner quantizes with the model's input scale
    pixels = np.random.default_rng(1).integers(0, 256, (IMAGES, SIZE, SIZE, 3)) * np.linspace(0.25, 1, IMAGES)[:, None,
                                                                                                   None, None]
    np.save(inputs, np.rint(pixels).astype(np.float32))
    _, here = run_runner([sys.executable], model, inputs, work / "here")
    if len(np.unique(here)) < 10:
        raise DeviceError("the self-check model's outputs hardly vary; it would not catch a wrong kernel")
    plan = [(REFERENCE_RUNTIME, core) for core in CORES] + [(rt, "cortex-a72") for rt in RUNTIMES[1:]]
    runs = []
    for runtime, core in plan:
        prefix = [str(LAUNCHER), "--board", str(board), "--cpu", core, "--unchecked", f"{runtime}/bin/python"]
        result, there = run_runner(prefix, model, inputs, work / f"{runtime}-{core}")
        runs.append(BoardRun(runtime, core, (result.get("runtime") or {}).get("version"),
                             (result.get("machine") or {}).get("machine"),
                             int((there.astype(np.int64) != here.astype(np.int64)).sum()),
                             runtime == REFERENCE_RUNTIME))
    return runs


def main(argv: list[str] | None = None) -> int:
    board = Path((argv or sys.argv[1:])[0]).resolve()
    with tempfile.TemporaryDirectory(prefix="xedge-board-check-") as tmp:
        try:
            runs = check(board, Path(tmp))
        except DeviceError as exc:
            print(f"error: self-check: {exc}", file=sys.stderr)
            return 1
    passed = all(r.passed for r in runs)
    atomic_write_json(board / "check.json", {"passed": passed, "images": IMAGES, "outputs_per_image": 10,
                                             "runs": [asdict(r) | {"passed": r.passed} for r in runs]})
    for r in runs:
        print(f"  {'ok  ' if r.passed else 'FAIL'} {r.runtime} ({r.version}) on {r.core}: {r.machine}, "
              f"{r.differing_outputs} of {IMAGES * 10} outputs differ from this machine's LiteRT"
              + ("" if r.must_match else " (reported, not required)"))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

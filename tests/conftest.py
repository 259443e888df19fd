"""Shared, session-scoped fixtures: the digits folder and tiny models built once.

Tiny means 71x71 input, width 0.25, one middle block: the whole suite must
run on 2 CPU cores in about 15 minutes, so expensive things (training,
conversion) happen once per session and are shared read-only. Tests that
modify an artifact copy it first.

Some tests need a system dependency (sshd, Chromium, the tflite-runtime venv,
root for a read-only tmpfs). Without it they skip on a developer's machine;
under ``.ci/run`` (``XEDGE_REQUIRE_ALL=1``) they fail, so CI cannot pass by
running less.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _sigint_as_a_shell_gives_it(request):
    """Children the tests interrupt must start with SIGINT as a shell starts them (Python's KeyboardInterrupt):
    a child inherits an ignored (or blocked) SIGINT from this process, and then no Ctrl-C reaches it. A shell
    starts a background job (``nohup ... &``) with SIGINT ignored, and pytest then too: checked after each
    test (from the first one on, in such a run) and given back, with a warning naming the test."""
    yield
    import warnings

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        warnings.warn(f"SIGINT was ignored in the test process after {request.node.nodeid}; restored", stacklevel=1)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, []) & {signal.SIGINT, signal.SIGTERM}
    if blocked:  # a blocked signal mask is inherited by children too
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        warnings.warn(f"{request.node.nodeid} left {sorted(blocked)} blocked in the test process; unblocked",
                      stacklevel=1)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TINY = dict(input_size=71, classes=10, width=0.25, middle_blocks=1)
REQUIRE_ALL = "XEDGE_REQUIRE_ALL"
LATENCY_TESTS = ROOT / "tests" / "devices" / "latency"


def require_all() -> bool:
    return os.environ.get(REQUIRE_ALL) == "1"


def missing(what: str) -> NoReturn:
    """A test's dependency is absent: skip it, or fail it under .ci/run (which sets XEDGE_REQUIRE_ALL=1)."""
    if require_all():
        pytest.fail(f"{what} ({REQUIRE_ALL}=1: every test must run here)", pytrace=False)
    pytest.skip(what)


def spread_batchnorm(model, seed: int = 0):
    """BatchNorm statistics away from their initial values (a weightless network's are 0 and 1), so a fold through
    them is exercised for real."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            g, b, m, v = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 2, g.shape).astype("f"), rng.normal(0, 0.5, b.shape).astype("f"),
                               rng.normal(0, 0.5, m.shape).astype("f"), rng.uniform(0.5, 2, v.shape).astype("f")])
    return model


def require_chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        missing("needs Debian's chromium on PATH (make system-deps installs it)")
    return found


@pytest.fixture(scope="session")
def chromium_bin() -> str:
    """Session-scoped, so a missing browser is reported before any expensive fixture runs."""
    return require_chromium()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under XEDGE_REQUIRE_ALL=1 any other skip in tests/ fails too (a skip that did not go through ``missing``).

    The one skip by design stays: the on-device latency tests without ``--device`` (``pytest devices --device
    NAME`` is how they run; there is no device in CI).
    """
    outcome = yield
    report = outcome.get_result()
    by_design = LATENCY_TESTS in Path(str(item.path)).parents and not item.config.getoption("--device")
    if require_all() and report.skipped and not hasattr(report, "wasxfail") and not by_design:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under {REQUIRE_ALL}=1, where every test must run: {reason}"


def run_cli(*args, cwd=None, timeout=600, env=None, check=False, input=None):
    """Run a console script (``xedge``/``convert``) as a real subprocess."""
    exe = VENV_BIN / args[0]
    cmd = [str(exe) if exe.exists() else args[0], *map(str, args[1:])]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env, input=input)
    _log_cli(args, proc.returncode)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def labeled_subset(source: str | Path, root: Path, per_class: int) -> Path:
    """``root`` made a labeled folder of the first ``per_class`` images of each class folder of ``source``."""
    for class_dir in sorted(Path(source).iterdir()):
        (root / class_dir.name).mkdir()
        for f in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy2(f, root / class_dir.name / f.name)
    return root


def invoke_cli(*args, cwd=None, env=None, check=False) -> subprocess.CompletedProcess:
    """Run a console script's command in this process with click's CliRunner, answered like ``run_cli``.

    For tests that check what a command says and its exit code: a subprocess costs a TensorFlow import (about
    10 s on 2 cores) each time. What only a real process shows stays with ``run_cli``: the entry point's exit
    (``convert.main``), signals, a terminal, TensorFlow's native log on fd 2, what gets imported. An exception
    the command lets escape is put on stderr as its traceback, as Python would print it, so "no Traceback"
    checks keep their meaning; its exit code is 1, as the real process's would be.
    """
    import traceback

    from click.testing import CliRunner

    import convert

    command = {"convert": convert.convert_command, "xedge": convert.cli}[args[0]]
    words = [str(a) for a in args[1:]]
    before = os.getcwd()
    convert._user_stderr.cache_clear()  # noqa: SLF001  (it would keep the previous invocation's stream)
    try:
        if cwd is not None:
            os.chdir(cwd)
        result = CliRunner().invoke(command, words, env=env, prog_name=args[0])
    finally:
        os.chdir(before)
        convert._user_stderr.cache_clear()  # noqa: SLF001
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    proc = subprocess.CompletedProcess([args[0], *words], result.exit_code, result.stdout, stderr)
    _log_cli(args, proc.returncode)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def _log_cli(args, returncode: int) -> None:
    """Append the command's name and exit code to $XEDGE_CLI_LOG: the transcript that proves a refactor kept them."""
    log = os.environ.get("XEDGE_CLI_LOG")
    if log:
        words = [a for a in map(str, args) if a.startswith("-") or "/" not in a][:6]
        with open(log, "a") as fh:
            fh.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{' '.join(words)}\t{returncode}\n")


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict:
    """scikit-learn's digits as train/val/samples image folders (class subfolders)."""
    from pipeline.core.digits import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def tiny_keras_path(tmp_path_factory) -> Path:
    """An untrained tiny Xception saved as a Keras 3 .keras file."""
    from pipeline.model.xception import build_xception

    path = tmp_path_factory.mktemp("tiny") / "tiny.keras"
    build_xception(**TINY).save(path)
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, digits):
    """A tiny Xception trained briefly on digits: a real run folder (model.keras, labels.json)."""
    from pipeline.model.train import TrainConfig, train

    cfg = TrainConfig(epochs=3, input_size=71, width=0.25, middle_blocks=1, batch_size=32, seed=0)
    return train(digits["train"], tmp_path_factory.mktemp("run"), cfg, val_dir=digits["val"])


@pytest.fixture(scope="session")
def calibration(digits):
    from calibrate.dataset import build_calibration_set
    from pipeline.core.preprocessing import PreprocessSpec

    return build_calibration_set(digits["samples"], PreprocessSpec(size=71), size=64, seed=0)


@pytest.fixture(scope="session")
def trained_tflite(tmp_path_factory, trained_run, calibration) -> dict:
    """The trained tiny model as float32 and int8 .tflite files (with manifests)."""
    from pipeline.conversion.export import ConvertSettings, export_tflite

    out = tmp_path_factory.mktemp("tflite")
    return {
        "float": export_tflite(trained_run.model_path, ConvertSettings("float"), out=out / "float.tflite").path,
        "int8": export_tflite(trained_run.model_path, ConvertSettings("int8"), out=out / "int8.tflite",
                              representative=calibration).path,
    }


@pytest.fixture
def copy_of(tmp_path):
    """Copy a shared artifact (file or folder) into this test's tmp_path before changing it."""

    def copy(path: Path) -> Path:
        target = tmp_path / Path(path).name
        if Path(path).is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)
        return target

    return copy

"""The `convert` command as users type it: CliRunner for the edges, real subprocesses for the path."""

import json
import os
import subprocess

from click.testing import CliRunner

from convert import cli, convert_command
from tests.conftest import invoke_cli, run_cli


def _imported_by(script: str, *args: str) -> set[str]:
    """The top-level packages a console script imports to run ``args`` (Python's own -X importtime list)."""
    from tests.conftest import VENV_BIN

    proc = subprocess.run([str(VENV_BIN / "python"), "-X", "importtime", str(VENV_BIN / script), *args],
                          capture_output=True, text=True, timeout=120, check=True)
    rows = [line.split("|")[-1] for line in proc.stderr.splitlines() if line.startswith("import time:")]
    return {row.strip().split(".")[0] for row in rows[1:]}  # rows[0] is the column header


def test_help_imports_no_tensorflow_and_explains():
    for script in ("convert", "xedge"):
        imported = _imported_by(script, "--help")
        assert "click" in imported  # the list is real
        assert not imported & {"tensorflow", "keras", "tf_keras", "ai_edge_litert", "numpy"}, script
    proc = run_cli("convert", "--help", check=True)
    for flag in ("--int8", "--int16x8", "--fp16", "--dynamic", "--float", "--calib", "--calib-size", "--float-io",
                 "--out", "--force", "--allow-float-fallback"):
        assert flag in proc.stdout
    assert "convert --int8 --calib ./samples" in proc.stdout
    xedge = run_cli("xedge", "--help", check=True)
    assert "convert" in xedge.stdout and "demo" in xedge.stdout


def test_usage_errors_are_one_line(tiny_keras_path, tmp_path):
    runner = CliRunner()
    no_mode = runner.invoke(convert_command, [str(tiny_keras_path)])
    assert no_mode.exit_code == 2 and "choose a mode" in no_mode.output
    two = runner.invoke(convert_command, [str(tiny_keras_path), "--fp16", "--calib", str(tmp_path)])
    assert two.exit_code == 2 and "calibration images are only used by int8 and int16x8" in two.output
    assert "(--calib)" in two.output


def test_library_errors_become_messages_not_tracebacks(tiny_keras_path, tmp_path):
    runner = CliRunner()
    cases = [
        ([str(tiny_keras_path), "--int8", "--out", str(tmp_path / "a.tflite")], "--calib DIR"),
        ([str(tmp_path / "nope.keras"), "--float"], "model not found"),
        ([str(tiny_keras_path), "--int8", "--calib", str(tmp_path / "nodir"), "--out", str(tmp_path / "b.tflite")],
         "calibration folder not found"),
    ]
    for args, message in cases:
        result = runner.invoke(cli, ["convert", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "Traceback" not in result.output
        assert result.output.strip().startswith("error:")
        assert len(result.output.strip().splitlines()) == 1


def test_without_model_and_without_runs(tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(convert_command, ["--float"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 2
    assert "no model given and no training run at runs/latest" in result.output
    assert "pass a model path" in result.output
    assert "xedge train" in result.output


def test_convert_int8_end_to_end_in_a_subprocess(trained_run, digits, tmp_path):
    """`convert --int8 --calib ./samples` with no MODEL picks runs/latest, as the README promises."""
    (tmp_path / "runs").mkdir()
    os.symlink(trained_run.run_dir, tmp_path / "runs" / "latest")
    os.symlink(digits["samples"], tmp_path / "samples")
    proc = run_cli("convert", "--int8", "--calib", "./samples", "--calib-size", "40", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "I0000" not in proc.stderr and "oneDNN" not in proc.stderr
    summary = json.loads(proc.stdout)
    out = tmp_path / summary["output"]
    assert summary["mode"] == "int8" and summary["calibration_samples"] == 40 and summary["float_ops"] == 0
    assert out.name == "model_int8.tflite" and out.exists()
    manifest = json.loads((tmp_path / summary["manifest"]).read_text())
    assert manifest["output"]["bytes"] == out.stat().st_size

    # the same folder in-process (CliRunner): what the commands say, with no second TensorFlow start-up
    again = invoke_cli("convert", "--int8", "--calib", "./samples", cwd=tmp_path)
    assert again.returncode == 2 and "output exists" in again.stderr and "--force" in again.stderr

    table = invoke_cli("xedge", "convert", "--fp16", "--out", str(tmp_path / "h.tflite"), cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "fp16" in table.stdout and "wrote" in table.stdout


def _run_in_terminal(args: list[str], timeout: float = 600) -> tuple[int, str]:
    """Run a console script with a pseudo-terminal as its stdin, stdout and stderr: (exit code, all it drew)."""
    import pty
    import select
    import subprocess

    from tests.conftest import VENV_BIN

    main, child = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    proc = subprocess.Popen([str(VENV_BIN / args[0]), *args[1:]], stdin=child, stdout=child, stderr=child, env=env,
                            close_fds=True)
    os.close(child)
    drawn = bytearray()
    try:
        while True:
            ready, _, _ = select.select([main], [], [], timeout)
            if not ready:
                raise AssertionError(f"{args[0]} drew nothing for {timeout} s; so far:\n{drawn.decode(errors='replace')}")
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: every copy of the terminal's other end is closed (the process ended)
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(main)
        code = proc.wait(timeout=60)
    return code, drawn.decode(errors="replace")


def test_calibration_bar_draws_on_a_terminal(tiny_keras_path, digits, tmp_path):
    """The bar is fed while the converter runs, when fd 2 points at the captured native log: it must still draw."""
    code, drawn = _run_in_terminal(["convert", str(tiny_keras_path), "--int8", "--calib", str(digits["samples"]),
                                    "--calib-size", "16", "--out", str(tmp_path / "m.tflite")])
    assert code == 0, drawn
    assert "calibrating" in drawn and "16/16" in drawn, drawn
    assert "wrote" in drawn and (tmp_path / "m.tflite").exists()

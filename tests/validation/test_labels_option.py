"""`--labels` wherever a labeled image folder is read: `xedge validate`, `xedge sweep`, `convert --max-drop`.

The model is the trained tiny digits model copied without its labels.json;
the eval folder holds 5 of its 10 classes, so the sorted folder names cannot
name its outputs and only `--labels` (the run's labels.json) can (issue 14, item 12).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli

CLASSES = ["3", "4", "5", "6", "7"]
PER_CLASS = 4


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory, trained_run) -> Path:
    """The trained model with nothing beside it: no labels.json, no manifest."""
    return Path(shutil.copy2(trained_run.model_path, tmp_path_factory.mktemp("bare") / "model.keras"))


@pytest.fixture(scope="module")
def five_classes(tmp_path_factory, digits) -> Path:
    root = tmp_path_factory.mktemp("five_classes")
    for name in CLASSES:
        (root / name).mkdir()
        for f in sorted((Path(digits["val"]) / name).iterdir())[:PER_CLASS]:
            shutil.copy2(f, root / name / f.name)
    return root


@pytest.fixture(scope="module")
def wrong_count(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "nine.json"
    path.write_text(json.dumps({"classes": [str(i) for i in range(9)]}))
    return path


def _one_line_error(result, expected: str) -> None:
    """A subprocess (returncode) or a CliRunner result (exit_code): exit 2 and one line on stderr."""
    code = getattr(result, "returncode", getattr(result, "exit_code", None))
    assert code == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


def _invoke(command: str, *args):
    """In-process, through the same click commands as the console scripts (one TensorFlow import for all)."""
    from click.testing import CliRunner

    from convert import cli

    return CliRunner().invoke(cli, [command, *map(str, args)])


def test_every_command_that_reads_an_eval_folder_shares_one_labels_option():
    from convert import cli

    options = {name: next(p for p in cli.commands[name].params if p.name == "labels")
               for name in ("validate", "sweep", "convert")}
    assert len({(o.opts[0], o.help, o.metavar) for o in options.values()}) == 1
    assert not any(p.name == "labels" for p in cli.commands["diff"].params)  # diff reads reports, not images


def test_sweep_without_labels_beside_the_model_needs_and_honours_labels(tmp_path, bare_model, five_classes,
                                                                       wrong_count, trained_run, digits):
    args = [bare_model, "--calib", digits["samples"], "--calib-size", 16, "--eval", five_classes,
            "--modes", "float,int8-fallback", "--max-drop", 100, "--no-bench"]
    proc = run_cli("xedge", "sweep", *args, "--out", tmp_path / "none")  # the case, on a real stderr
    _one_line_error(proc, "sorted class folder names gives 5 class names but the model has 10 outputs; "
                          "pass --labels FILE")
    assert not (tmp_path / "none").exists()  # checked before anything was converted or written
    result = _invoke("sweep", *args, "--out", tmp_path / "nine", "--labels", wrong_count)
    _one_line_error(result, f"--labels {wrong_count} gives 9 class names but the model has 10 outputs")

    labels = trained_run.run_dir / "labels.json"
    result = _invoke("sweep", *args, "--out", tmp_path / "ok", "--labels", labels)
    assert result.exit_code == 0, result.output[-3000:]
    record = json.loads((tmp_path / "ok" / "sweep.json").read_text())
    assert record["eval"]["labels"] == f"--labels {labels}" and record["eval"]["images"] == 5 * PER_CLASS
    for mode in ("float", "int8-fallback"):
        report = json.loads((tmp_path / "ok" / "reports" / mode / "report.json").read_text())
        assert report["data"]["labels_source"] == f"--labels {labels}"
        assert report["data"]["classes"] == json.loads(labels.read_text())["classes"]
        assert set(report["per_class"]) == set(CLASSES)  # digits 3..7 scored as outputs 3..7
    manifest = json.loads((tmp_path / "ok" / "model_int8-fallback.manifest.json").read_text())
    assert manifest["float_fallback"]["eval"]["labels"] == f"--labels {labels}"


def test_convert_max_drop_and_validate_take_labels(tmp_path, bare_model, five_classes, wrong_count, digits):
    args = [bare_model, "--int8", "--calib", digits["samples"], "--calib-size", 8, "--max-drop", 100,
            "--eval", five_classes, "--out", tmp_path / "q.tflite"]
    _one_line_error(_invoke("convert", *args), "sorted class folder names gives 5 class names but the model has "
                                               "10 outputs")
    _one_line_error(_invoke("convert", *args, "--labels", wrong_count), f"--labels {wrong_count} gives 9 class names")
    assert not (tmp_path / "q.tflite").exists()
    result = _invoke("convert", bare_model, "--float", "--labels", wrong_count, "--out", tmp_path / "f.tflite")
    assert result.exit_code == 2 and "labels name the classes of the eval images" in result.stderr
    assert "(--labels)" in result.stderr

    result = _invoke("validate", bare_model, bare_model, "--data", five_classes, "--report", tmp_path / "r",
                     "--labels", wrong_count)
    _one_line_error(result, f"--labels {wrong_count} gives 9 class names but the model has 10 outputs")

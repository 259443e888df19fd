"""The CLI is glue: a rule about option values lives in the library, once, and the CLI only words its errors.

Read from the source with ``ast``: a rule in ``convert.py`` is an ``if`` that raises and whose condition reads
the command's own parameters (a check on option values, or options compared with each other).
"""

from __future__ import annotations

import ast
import re

import pytest
from click.testing import CliRunner

from tests.test_architecture import ROOT

# Rules convert.py may hold, each with the reason the library cannot hold it.
CLI_RULES_OK = {
    "bench_command": "--compare with several --threads: which library call runs (compare takes one thread count "
                     "by its signature) is the CLI's dispatch, not a rule on settings",
}


def _rules(tree: ast.AST) -> list[tuple[str, int, str]]:
    """(function, line, condition) for each ``if`` that raises on a condition over the function's parameters."""
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
        for node in ast.walk(fn):
            if not isinstance(node, ast.If) or not any(isinstance(n, ast.Raise) for n in node.body):
                continue
            read = {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
            if read & params:
                found.append((fn.name, node.lineno, ast.unparse(node.test)))
    return found


def test_the_rule_walker_sees_a_rule():
    source = ("def cmd(mode, calib):\n    if calib and mode != 'int8':\n        raise click.UsageError('x')\n"
              "def parse(value):\n    threads = value\n    if not threads:\n        raise X\n")
    assert _rules(ast.parse(source)) == [("cmd", 2, "calib and mode != 'int8'")]


def test_convert_py_holds_no_rule_on_option_values():
    rules = [r for r in _rules(ast.parse((ROOT / "convert.py").read_text())) if r[0] not in CLI_RULES_OK]
    assert not rules, ("convert.py checks option values itself; let the library's settings check them "
                       "(pipeline/conversion/settings.py) and raise SettingsError(setting=...):\n"
                       + "\n".join(f"convert.py:{line} in {fn}: if {test}" for fn, line, test in rules))


def test_every_setting_the_library_refuses_has_a_flag():
    """The settings named by the library's usage errors are options of ``convert``, so the CLI can word them."""
    import convert

    settings = set(re.findall(r'setting="(\w+)"', (ROOT / "pipeline/conversion/settings.py").read_text()))
    assert {"calib", "eval_dir", "max_drop_pp", "fallback", "float_io", "input_convention"} <= settings
    options = {o.opts[0] for o in convert.convert_command.params if o.opts and o.opts[0].startswith("--")}
    for setting in settings - {"float_layers"}:  # float_layers: set by the budget search, not by an option
        if setting == "mode":
            assert set(convert.SETTING_FLAGS["mode"].replace(" or", ",").split(", ")) <= options
            continue
        flag = convert.SETTING_FLAGS.get(setting) or "--" + setting.replace("_", "-")
        assert flag in options, (setting, flag)


@pytest.mark.parametrize("args, flag", [
    (["--fp16", "--calib", "d"], "--calib"),
    (["--float", "--float-io"], "--float-io"),
    (["--int8", "--calib", "d", "--max-drop", "1"], "--eval"),
    (["--int8", "--calib", "d", "--eval", "d"], "--max-drop"),
    (["--int8", "--calib", "d", "--labels", "l.json"], "--labels"),
    (["--fp16", "--max-drop", "1", "--eval", "d"], "--max-drop"),
    (["--int8", "--calib", "d", "--fallback", "int16"], "--fallback"),
    (["--int16x8", "--calib", "d", "--fallback", "int16", "--max-drop", "1", "--eval", "d"], "--fallback"),
    (["--int8", "--float-io", "--calib", "d", "--input-convention", "pixels-int8"], "--input-convention"),
    (["--int16x8", "--calib", "d", "--input-convention", "pixels"], "--input-convention"),
    (["--fp16", "--rounding", "learned"], "--rounding"),
    (["--int16x8", "--calib", "d", "--ranges", "mse"], "--ranges"),
    (["--float", "--bias-correction"], "--bias-correction"),
])
def test_the_cli_words_the_library_refusal_with_its_flag(args, flag):
    """Exit 2 with the usage line and the flag at fault, before any model is read (m.keras does not exist)."""
    result = CliRunner().invoke(__import__("convert").convert_command, ["m.keras", *args])
    assert result.exit_code == 2, result.output
    assert "Usage:" in result.output and f"({flag})" in result.output, result.output
    assert "not found" not in result.output and "Traceback" not in result.output


def test_no_mode_names_the_mode_flags():
    result = CliRunner().invoke(__import__("convert").convert_command, ["m.keras"])
    assert result.exit_code == 2 and "choose a mode: --float, --dynamic" in result.output


def test_convert_main_runs_the_exit_handlers_and_keeps_the_exit_code():
    """``convert`` skips Python's teardown (``exit_without_teardown``) but not the exit handlers, which clean up."""
    import os
    import subprocess
    import sys

    code = "import atexit, convert; atexit.register(lambda: print('handlers ran')); convert.main()"
    for args, exit_code in ((["--help"], 0), (["m.keras"], 2)):
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == exit_code, proc.stderr
        assert proc.stdout.rstrip().endswith("handlers ran"), proc.stdout

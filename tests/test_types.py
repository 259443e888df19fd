"""The type checker passes on the library, the CLI, calibration and the device code.

mypy's settings (which packages are read as untyped, how strict) are in
pyproject.toml's ``[tool.mypy]``; ``make test`` runs this file with the rest.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib

from tests.conftest import ROOT, missing

CHECKED = ["pipeline", "calibrate", "devices", "convert.py"]


def test_mypy_is_configured_for_the_checked_code():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["files"] == CHECKED and config["python_version"] == "3.11" and config["check_untyped_defs"]


def test_mypy_finds_no_type_errors():
    if importlib.util.find_spec("mypy") is None:
        missing("needs mypy (the dev extra: make install)")
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mypy reports:\n{proc.stdout}{proc.stderr}"

"""The project's own promises about where it runs: the Python it declares, and CI that runs every test."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.specifiers import SpecifierSet

from tests.conftest import ROOT, missing, require_chromium


def _requires_python() -> SpecifierSet:
    return SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])


def _makefile_range() -> tuple[str, str]:
    text = (ROOT / "Makefile").read_text()
    return (re.search(r"^PYTHON_MIN := (\S+)$", text, re.M).group(1),
            re.search(r"^PYTHON_BELOW := (\S+)$", text, re.M).group(1))


def test_declared_python_floor_is_the_one_the_code_needs():
    """tomllib (devices/profile.py) is 3.11; tarfile's extraction filter (devices/ssh.py) is 3.11.4 in 3.11."""
    spec = _requires_python()
    assert "3.11.4" in spec and "3.11.3" not in spec and "3.10.14" not in spec
    assert platform.python_version() in spec  # the interpreter running the tests is one the project admits
    low, below = _makefile_range()
    assert spec == SpecifierSet(f">={low},<{below}")  # the Makefile checks the same range


def _fake_python(tmp_path, version: str):
    exe = tmp_path / f"python{version}"
    exe.write_text(f"#!/bin/sh\necho {version}\n")
    exe.chmod(0o755)
    return exe


@pytest.mark.parametrize("version", ["3.10.12", "3.11.3", "3.13.0", "3.11.4", "3.11.10", "3.12.7"])
def test_make_refuses_a_python_outside_the_declared_range(tmp_path, version):
    exe = _fake_python(tmp_path, version)
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "check-python", f"PYTHON={exe}"],
                          capture_output=True, text=True, timeout=60)
    if version in _requires_python():
        assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    else:
        assert proc.returncode != 0
        low, below = _makefile_range()
        assert proc.stdout == (f"error: {exe} is Python {version}; xception-edge needs Python >= {low} and "
                               f"< {below} (make PYTHON=... chooses another)\n")


def test_missing_dependency_skips_here_and_fails_under_ci(monkeypatch):
    monkeypatch.delenv("XEDGE_REQUIRE_ALL", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs a thing"):
        missing("needs a thing")
    monkeypatch.setenv("XEDGE_REQUIRE_ALL", "1")
    with pytest.raises(pytest.fail.Exception, match="needs a thing"):
        missing("needs a thing")


def test_chromium_missing_from_path_fails_under_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no chromium on PATH
    monkeypatch.setenv("XEDGE_REQUIRE_ALL", "1")
    with pytest.raises(pytest.fail.Exception, match="chromium"):
        require_chromium()
    monkeypatch.delenv("XEDGE_REQUIRE_ALL")
    with pytest.raises(pytest.skip.Exception, match="chromium"):
        require_chromium()


def test_ci_turns_any_skip_in_tests_into_a_failure(tmp_path):
    """A skip that does not go through ``missing`` (a plain pytest.skip) fails under .ci/run's variable too."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")  # the hook under test, nothing else
    (tmp_path / "test_probe.py").write_text("import pytest\n\n\ndef test_skips():\n    pytest.skip('no such thing')\n")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "XEDGE_REQUIRE_ALL"}
    laptop = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert laptop.returncode == 0 and "1 skipped" in laptop.stdout, laptop.stdout
    ci = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                        env={**env, "XEDGE_REQUIRE_ALL": "1"})
    assert ci.returncode == 1 and "1 failed" in ci.stdout and "no such thing" in ci.stdout, ci.stdout


def test_ci_entry_point_requires_every_dependency(tmp_path):
    run = (ROOT / ".ci" / "run").read_text()
    assert "export XEDGE_REQUIRE_ALL=1" in run and "\nmake test\n" in run
    # `make test` makes the tflite-runtime venv the runner test uses (shown here for a venv not yet made).
    # ... and the emulated arm64 board the tests/devices/test_arm64_board.py runs on.
    make = subprocess.run(["make", "-n", "-C", str(ROOT), "test", f"TFLITE_RUNTIME={tmp_path / 'rt'}",
                           f"ARM64_BOARD={tmp_path / 'board'}"], capture_output=True, text=True, timeout=60)
    assert f"{tmp_path / 'rt'}/bin/python -m pip install --quiet 'numpy<2' tflite-runtime==2.14.0" in make.stdout
    assert f"devices/arm64/build.sh {tmp_path / 'board'} .venv/bin/python" in make.stdout

"""How long the ``convert`` process takes to end after it has written its output, with and without Python's
teardown: the figure behind ``convert.exit_without_teardown``.

    PYTHONPATH=$PWD .venv/bin/python bench/teardown.py MODEL.keras float 3

Each run converts MODEL in a fresh process, once ending through ``convert.main`` (exit handlers, then
``os._exit``) and once through click's plain exit, and prints the seconds from the "wrote" line to the end of
the process. An untrained ``build_xception(299, 1000, 1.0, 8)`` saved as .keras is a fair MODEL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {"os._exit": "import convert; convert.main()",
            "plain exit": "import convert; convert.convert_command(prog_name='convert')"}


def after_wrote(code: str, args: list[str]) -> tuple[int, float, float]:
    """(exit code, total seconds, seconds from the "wrote" line to the end of the process)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.stdout is not None
    wrote = None
    for line in proc.stdout:
        if line.startswith("wrote"):
            wrote = time.perf_counter()
    proc.wait()
    end = time.perf_counter()
    return proc.returncode, end - t0, end - (wrote or end)


def main() -> None:
    model, mode, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3
    with tempfile.TemporaryDirectory(prefix="xedge-teardown-") as tmp:
        out = str(Path(tmp) / f"model_{mode}.tflite")
        for _ in range(repeats):
            for name, code in VARIANTS.items():
                rc, total, tail = after_wrote(code, [model, f"--{mode}", "--out", out, "--force"])
                print(f"{name:10s} exit {rc}: total {total:6.2f} s, after 'wrote' {tail:5.2f} s", flush=True)


if __name__ == "__main__":
    main()

"""The arguments every int8 bench takes the same way: a model, its calibration images and the eval photos."""

from __future__ import annotations

import argparse
from pathlib import Path


def model_and_images(prog: str, description: str, *, eval_dir: bool = True) -> argparse.ArgumentParser:
    """A parser with ``model``, ``--calib`` and ``--calib-size`` (and ``--eval`` unless ``eval_dir`` is False)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib", type=Path, required=True)
    if eval_dir:
        parser.add_argument("--eval", dest="eval_dir", type=Path, required=True)
    parser.add_argument("--calib-size", type=int, default=200)
    return parser

"""The embedded default dataset: scikit-learn's bundled digits as an image folder.

scikit-learn ships the 1,797 8x8 digit images inside its wheel, so the demo
and the tests need no download. Each digit is upscaled to 32x32 (bilinear,
0-16 ink mapped to 255-0, dark ink on white like a scanned form) and written
as PNG under ``train/``, ``val/`` and ``samples/`` with one folder per class.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.errors import DataError

SIZE = 32


def _to_image(digit: np.ndarray):
    gray = (255.0 - digit * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((SIZE, SIZE), Image.Resampling.BILINEAR)


def write_digits(out: str | os.PathLike, *, val_fraction: float = 0.2, samples: int = 100,
                 seed: int = 0, limit: int | None = None) -> dict[str, Path]:
    """Write train/val/samples folders; return their paths.

    ``val`` is a stratified hold-out; ``samples`` (for calibration) is drawn
    from the training images, as calibration data should come from the
    training distribution and never from the images used to judge accuracy.
    """
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(digits.target):
        by_class.setdefault(int(target), []).append(index)
    rng = random.Random(seed)
    split: dict[str, list[int]] = {"train": [], "val": [], "samples": []}
    for target, indices in sorted(by_class.items()):
        rng.shuffle(indices)
        if limit is not None:
            indices = indices[: max(2, limit // len(by_class))]
        n_val = max(1, round(len(indices) * val_fraction))
        split["val"].extend(indices[:n_val])
        split["train"].extend(indices[n_val:])
    rng.shuffle(split["train"])
    split["samples"] = sorted(split["train"][:samples])
    paths = {}
    try:
        for name, indices in split.items():
            folder = out / name
            for index in indices:
                target = int(digits.target[index])
                path = folder / str(target) / f"digit_{index:04d}.png"
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _to_image(digits.images[index]).save(path)
            paths[name] = folder
    except OSError as exc:
        raise DataError(f"cannot write the digits dataset to {out}: {exc.strerror or exc}") from None
    return paths

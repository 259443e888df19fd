"""Realistic benchmark images without a download.

scikit-learn ships two real photographs (a temple in China, a flower). Crops
at several scales, positions and flips give a folder of distinct natural
images with real textures and colour statistics; zeros or uniform noise
would run faster through XNNPACK and calibrate to nonsense ranges.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np


def write_photo_crops(out: Path, count: int, seed: int = 0) -> Path:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out.mkdir(parents=True, exist_ok=True)
    if len(list(out.glob("*.jpg"))) >= count:
        return out
    photos = [Image.fromarray(np.asarray(im)) for im in load_sample_images().images]
    rng = random.Random(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = rng.randint(min(w, h) // 3, min(w, h))
        left, top = rng.randint(0, w - side), rng.randint(0, h - side)
        crop = photo.crop((left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(out / f"photo_{i:04d}.jpg", quality=92)
    return out

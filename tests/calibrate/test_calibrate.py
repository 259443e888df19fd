"""Calibration sets: deterministic stratified samples, listed skips, refusals."""

import os
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from calibrate.dataset import build_calibration_set
from calibrate.sampling import stratified_order
from pipeline.core.errors import CalibrationError
from pipeline.core.preprocessing import PreprocessSpec

SPEC = PreprocessSpec(32)


def _img(path, value, size=(20, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path)


def _folder(tmp_path, classes=3, per_class=6):
    for c in range(classes):
        for i in range(per_class):
            _img(tmp_path / f"class {c}" / f"img_{i}.png", c * 100 + i)
    return tmp_path


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 12), min_size=1, max_size=6), seed=st.integers(0, 10**6))
def test_stratified_order_is_a_deterministic_interleaving(sizes, seed):
    groups = {f"c{i}": [f"c{i}/{j}" for j in range(n)] for i, n in enumerate(sizes)}
    order = list(stratified_order(groups, seed))
    assert order == list(stratified_order(groups, seed))
    assert sorted(order) == sorted(x for g in groups.values() for x in g)  # each item exactly once
    # Any prefix is balanced: no class is ahead of another by more than one while both still have items.
    for k in range(1, len(order) + 1):
        counts = Counter(x.split("/")[0] for x in order[:k])
        open_classes = [c for c, items in groups.items() if counts[c] < len(items)]
        if open_classes:
            assert max(counts.values(), default=0) - min(counts[c] for c in open_classes) <= 1


def test_sample_is_deterministic_stratified_and_hashed(tmp_path):
    root = _folder(tmp_path)
    a = build_calibration_set(root, SPEC, size=6, seed=1)
    b = build_calibration_set(root, SPEC, size=6, seed=1)
    c = build_calibration_set(root, SPEC, size=6, seed=2)
    assert [f["path"] for f in a.files] == [f["path"] for f in b.files]
    assert [f["path"] for f in a.files] != [f["path"] for f in c.files]
    assert Counter(f["label"] for f in a.files) == {"class 0": 2, "class 1": 2, "class 2": 2}
    import hashlib

    first = a.files[0]
    assert first["sha256"] == hashlib.sha256((root / first["path"]).read_bytes()).hexdigest()
    batches = list(a.batches())
    assert len(batches) == 6 and batches[0][0].shape == (1, 32, 32, 3) and batches[0][0].dtype == np.float32
    manifest = a.to_manifest()
    assert manifest["count"] == 6 and manifest["seed"] == 1 and manifest["skipped"] == []


def test_bad_files_are_skipped_with_reasons(tmp_path):
    root = _folder(tmp_path, classes=2, per_class=2)
    (root / "class 0" / "empty.jpg").write_bytes(b"")
    (root / "class 0" / "notes.txt").write_text("hello")
    (root / "class 1" / "fake.jpg").write_text("this is text")
    good = (root / "class 1" / "img_0.png").read_bytes()
    (root / "class 1" / "trunc.png").write_bytes(good[: len(good) // 3])
    os.symlink(root / "missing.png", root / "class 1" / "dangling.png")
    cal = build_calibration_set(root, SPEC, size=50, seed=0)
    assert len(cal) == 4
    reasons = {os.path.basename(s.path): s.reason for s in cal.skipped}
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["notes.txt"].startswith("not an image")
    assert "not a recognised image" in reasons["fake.jpg"]
    assert "corrupt or truncated" in reasons["trunc.png"]
    assert "symlink" in reasons["dangling.png"]
    assert all(not f["path"].endswith(("empty.jpg", "fake.jpg", "trunc.png")) for f in cal.files)


def test_refusals(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        build_calibration_set(tmp_path / "nope", SPEC)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no usable"):
        build_calibration_set(tmp_path / "empty", SPEC)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.png").write_text("x")
    with pytest.raises(CalibrationError, match="all 2 files were skipped"):
        build_calibration_set(bad, SPEC)
    same = tmp_path / "same"
    for i in range(5):
        _img(same / f"copy_{i}.png", 7)
    with pytest.raises(CalibrationError, match="one image repeated 5 times"):
        build_calibration_set(same, SPEC)
    with pytest.raises(CalibrationError, match="at least 1"):
        build_calibration_set(same, SPEC, size=0)


def test_npy_samples(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "pixels.npy", rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8))
    np.save(tmp_path / "inputs.npy", rng.uniform(-1, 1, size=(32, 32, 3)).astype(np.float32))
    np.save(tmp_path / "wrong_range.npy", rng.uniform(0, 255, size=(32, 32, 3)).astype(np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cal = build_calibration_set(tmp_path, SPEC, size=10)
    assert sorted(f["path"] for f in cal.files) == ["inputs.npy", "pixels.npy"]
    reasons = {os.path.basename(s.path): s.reason for s in cal.skipped}
    assert "outside [-1, 1]" in reasons["wrong_range.npy"]
    assert "unreadable .npy" in reasons["objects.npy"]  # pickled object arrays are never loaded
    for (x,) in cal.batches():
        assert x.shape == (1, 32, 32, 3) and x.min() >= -1 and x.max() <= 1

"""The paired statistics behind `xedge validate`, checked against brute force and known values."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.data import Item
from pipeline.core.errors import ValidationError
from pipeline.tflite.layers import layer_names
from pipeline.validation.metrics import drift_metrics, kl_rows, mcnemar_exact, paired_drop_ci, topk
from pipeline.validation.predict import OutputKind, as_probabilities
from pipeline.validation.validate import Budgets, select_round_robin


def brute_mcnemar(b, c):
    n = b + c
    k = min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


@given(st.integers(0, 60), st.integers(0, 60))
@settings(max_examples=200, deadline=None)
def test_mcnemar_matches_brute_force_and_is_symmetric(b, c):
    p = mcnemar_exact(b, c)
    assert p == pytest.approx(brute_mcnemar(b, c) if b + c else 1.0, rel=1e-9)
    assert p == pytest.approx(mcnemar_exact(c, b), rel=1e-12)
    assert 0.0 <= p <= 1.0


def test_mcnemar_known_values_and_large_counts():
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(3000, 3300) < 1e-3  # no overflow at dataset scale


@given(st.integers(0, 50), st.integers(0, 50), st.integers(0, 400))
@settings(max_examples=200, deadline=None)
def test_drop_interval_contains_the_estimate_and_never_collapses(b, c, rest):
    n = b + c + rest
    if n == 0:
        return
    lo, hi = paired_drop_ci(b, c, n)
    assert -100.0 <= lo < hi <= 100.0
    assert lo - 1e-9 <= (b - c) / n * 100 <= hi + 1e-9


def test_drift_metrics_by_hand():
    ref = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    cand = np.array([[0.8, 0.2, 0.0], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1]])
    labels = np.array([0, 1, 2, 1])
    m = drift_metrics(ref, cand, labels, ["a", "b", "c"])
    assert m["top1_float"] == 0.75 and m["top1_quant"] == 0.75
    assert m["mcnemar"]["reference_only_correct"] == 1 and m["mcnemar"]["candidate_only_correct"] == 1
    assert m["top1_drop_pp"] == 0.0 and m["agreement"] == 0.5
    assert m["per_class"]["b"] == {"n": 2, "top1_float": 0.5, "top1_quant": 0.5, "drop_pp": 0.0, "agreement": 0.0}
    assert m["kl_mean"] == pytest.approx(float(np.mean(kl_rows(ref, cand))))
    assert kl_rows(ref, ref) == pytest.approx(np.zeros(4), abs=1e-9)
    unlabeled = drift_metrics(ref, cand, None, ["a", "b", "c"])
    assert unlabeled["top1_float"] is None and unlabeled["per_class_by"] == "reference prediction"


def test_topk_breaks_ties_by_index():
    assert topk(np.array([[0.0, 0.5, 0.5, 0.0]]), 3).tolist() == [[1, 2, 0]]


def test_outputs_are_read_as_the_model_says_not_from_their_values():
    looks_like_probabilities = np.array([[0.5, 0.49, 0.0], [0.25, 0.0, 0.0]])  # rows sum to 0.99 and 0.25
    probs = as_probabilities(looks_like_probabilities, OutputKind(False, "no softmax"), "x")
    exp = np.exp(looks_like_probabilities)
    assert np.allclose(probs, exp / exp.sum(axis=1, keepdims=True), rtol=1e-12, atol=0)  # logits: softmax, always
    probs = as_probabilities(looks_like_probabilities, OutputKind(True, "softmax"), "x")
    assert np.array_equal(probs, looks_like_probabilities)  # probabilities: as dequantized, not renormalised
    assert OutputKind(False, "FULLY_CONNECTED").describe() == "logits (FULLY_CONNECTED; softmax applied)"
    assert OutputKind(True, "SOFTMAX op").describe() == "probabilities (SOFTMAX op)"
    for kind in (OutputKind(True, "softmax"), OutputKind(False, "none")):
        with pytest.raises(ValidationError, match="NaN"):
            as_probabilities(np.array([[0.5, 0.5], [np.nan, 1.0]]), kind, "candidate")


def test_limit_takes_every_class():
    items = [Item(f"{c}/{i}.png", c) for c in "abc" for i in range(10)]
    chosen = select_round_robin(items, 7)
    assert len(chosen) == 7 and {i.label for i in chosen} == {"a", "b", "c"}


def test_budgets_say_by_how_much():
    verdicts, misses = Budgets(max_top1_drop_pp=1.0, min_agreement=0.99).check(
        {"top1_drop_pp": 3.5, "agreement": 0.995, "kl_mean": 0.1})
    assert misses == ["top1 drop: 3.50 pp vs budget 1.00 pp (over by 2.50 pp)"]
    assert verdicts["agreement"]["passed"]
    with pytest.raises(ValidationError):
        Budgets(min_agreement=1.5)


def test_layer_names_from_fused_tensor_names():
    name = ("xception_1/block2_sepconv2_act_1/Relu;xception_1/block2_sepconv1_bn_1/batchnorm/add_1;"
            "xception_1/block2_sepconv1_1/separable_conv2d")
    assert layer_names(name) == ["block2_sepconv2_act", "block2_sepconv1_bn", "block2_sepconv1"]
    assert layer_names("model/conv_2/Conv2D") == ["conv_2"]  # no Keras 3 scope suffix to strip


def test_top5_overlap_is_tie_aware():
    ref = np.array([[0.5, 0.2, 0.1, 0.08, 0.07, 0.05]])
    cand = np.array([[0.6, 0.4, 0.0, 0.0, 0.0, 0.0]])  # a quantized output: four classes tied at zero
    # a, b certain; three of the four tied classes fill the last three places: c, d, e each 3/4 likely
    assert drift_metrics(ref, cand, None, list("abcdef"))["top5_agreement"] == pytest.approx(0.85)
    cand = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])  # all mass on one class: not a perfect overlap
    assert drift_metrics(ref, cand, None, list("abcdef"))["top5_agreement"] == pytest.approx(0.8)
    cand = np.array([[0.5, 0.0, 0.1, 0.1, 0.1, 0.2]])  # class b really fell out of the top five
    assert drift_metrics(ref, cand, None, list("abcdef"))["top5_agreement"] == 0.8


def test_thousand_class_plots_stay_small():
    """ImageNet-sized reports: plots show the classes that changed most (a full 1000-class figure took 20 GB)."""
    import base64
    import resource
    import time

    from pipeline.validation.report_html import MAX_PLOTTED_CLASSES, confusion_plot, per_class_plot

    rng = np.random.default_rng(0)
    names = [f"class_{i:04d}" for i in range(1000)]
    m = np.zeros((1000, 1000), int)
    m[rng.integers(0, 1000, 50), rng.integers(0, 1000, 50)] = rng.integers(-3, 4, 50)
    r = {"per_class": {n: {"top1_float": float(rng.random()), "top1_quant": float(rng.random())} for n in names},
         "per_class_by": "true label", "data": {"classes": names},
         "confusion_change": {"matrix": m.tolist(), "kind": "candidate minus reference"}}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    pngs = [per_class_plot(r), confusion_plot(r)]
    assert time.perf_counter() - start < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1_000_000  # KiB: under 1 GB more
    for png in pngs:
        assert len(base64.b64decode(png)) < 2_000_000
    assert MAX_PLOTTED_CLASSES == 30

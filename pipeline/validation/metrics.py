"""Paired drift statistics between a reference and a candidate model.

Both models see the same images, so accuracy differences are paired: the
confidence interval and the test use only the images on which exactly one
model is right (McNemar), which is far tighter than comparing two
independent accuracies.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-7  # probabilities are clipped here before logs, so a quantized 0 gives a large but finite KL
Z95 = 1.959963984540054


def topk(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries per row, best first (ties broken by lower index)."""
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")
    return order[:, :k]


def topk_overlap(ref_top: np.ndarray, cand: np.ndarray, k: int) -> np.ndarray:
    """Expected share of the reference's top k inside the candidate's top k, ties broken at random.

    A quantized output cannot order classes below its scale (an int8 softmax
    rounds everything under 1/512 to zero), so its top k is often decided by
    a tie. Index order would make that overlap arbitrary, and counting every
    tied class as shared would make a model that puts all mass on one class
    look perfect; the expectation over random tie-breaking is neither.
    """
    kth = np.sort(cand, axis=1)[:, -k][:, None]
    greater = np.sum(cand > kth, axis=1, keepdims=True)
    tied = np.sum(cand == kth, axis=1, keepdims=True)
    scores = np.take_along_axis(cand, ref_top, axis=1)
    share = np.where(scores > kth, 1.0, np.where(scores == kth, (k - greater) / tied, 0.0))
    return share.sum(axis=1) / k


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b successes in b + c at 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    log_half = n * math.log(0.5)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half for i in range(k + 1)]
    top = max(terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in terms)
    return min(1.0, 2.0 * tail)


def paired_drop_ci(b: int, c: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of the paired accuracy difference (reference - candidate), in percentage points.

    Bonett and Price's adjusted Wald interval (2012): one pseudo-count in each
    discordant cell keeps the interval honest when there are no flips at all,
    where the plain Wald interval collapses to a width of zero.
    """
    if n <= 0:
        return (float("nan"), float("nan"))
    p_b, p_c = (b + 1) / (n + 2), (c + 1) / (n + 2)
    diff = p_b - p_c
    half = z * math.sqrt(max(p_b + p_c - diff * diff, 0.0) / (n + 2))
    return (max(-1.0, diff - half) * 100.0, min(1.0, diff + half) * 100.0)


def kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, in nats."""
    p = np.clip(p, EPS, 1.0)
    q = np.clip(q, EPS, 1.0)
    p = p / p.sum(axis=1, keepdims=True)
    q = q / q.sum(axis=1, keepdims=True)
    return np.sum(p * (np.log(p) - np.log(q)), axis=1)


def cosine_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    num = np.sum(p * q, axis=1)
    den = np.linalg.norm(p, axis=1) * np.linalg.norm(q, axis=1)
    return num / np.maximum(den, 1e-12)


def drift_metrics(ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None, names: list[str]) -> dict:
    """All summary figures of one validation; ``labels`` are output indices or None (agreement only).

    ``names`` maps output indices to class names.
    """
    k = min(5, ref.shape[1])
    ref_top, cand_top = topk(ref, k), topk(cand, k)
    ref_pred, cand_pred = ref_top[:, 0], cand_top[:, 0]
    out = _agreement_figures(ref, cand, ref_top, cand_top, k)
    if labels is None:
        out["per_class"] = _per_predicted_class(ref_pred, cand_pred, names)
        out["per_class_by"] = "reference prediction"
        return out
    ref_ok, cand_ok = ref_pred == labels, cand_pred == labels
    out.update(_accuracy_figures(labels, ref_top, cand_top, ref_ok, cand_ok, len(ref)))
    out["per_class"] = _per_true_class(labels, ref_pred, cand_pred, ref_ok, cand_ok, names)
    out["per_class_by"] = "true label"
    return out


def _agreement_figures(ref, cand, ref_top, cand_top, k: int) -> dict:
    """The figures that need no labels; the labeled ones are present as None, so every report has every key."""
    ref_pred, cand_pred = ref_top[:, 0], cand_top[:, 0]
    overlap = topk_overlap(ref_top, cand, k)
    kl = kl_rows(ref, cand)
    return {
        "samples": len(ref),
        "topk": k,
        "agreement": float(np.mean(ref_pred == cand_pred)),
        "top5_agreement": float(np.mean(overlap)),
        "reference_top1_in_candidate_top5": float(np.mean([a in b for a, b in zip(ref_pred, cand_top)])),
        "kl_mean": float(np.mean(kl)),
        "kl_max": float(np.max(kl)),
        "prob_max_abs_diff": float(np.max(np.abs(ref - cand))),
        "prob_cosine_mean": float(np.mean(cosine_rows(ref, cand))),
        "top1_float": None, "top1_quant": None, "top5_float": None, "top5_quant": None,
        "top1_drop_pp": None, "top1_drop_ci95_pp": None, "mcnemar": None,
    }


def _per_predicted_class(ref_pred, cand_pred, names: list[str]) -> dict[str, dict]:
    """Without labels: per class the reference predicts, how often the candidate predicts it too."""
    per_class: dict[str, dict] = {}
    for idx in np.unique(ref_pred):
        mask = ref_pred == idx
        per_class[names[idx]] = {"n": int(mask.sum()), "top1_float": None, "top1_quant": None,
                                 "drop_pp": None, "agreement": float(np.mean(cand_pred[mask] == idx))}
    return per_class


def _accuracy_figures(labels, ref_top, cand_top, ref_ok, cand_ok, n: int) -> dict:
    """Top-1/top-5 of both models and the paired top-1 drop over ``n`` images, with its interval and McNemar test."""
    b = int(np.sum(ref_ok & ~cand_ok))  # only the reference is right
    c = int(np.sum(~ref_ok & cand_ok))  # only the candidate is right
    lo, hi = paired_drop_ci(b, c, n)
    return {
        "top1_float": float(np.mean(ref_ok)),
        "top1_quant": float(np.mean(cand_ok)),
        "top5_float": float(np.mean([y in row for y, row in zip(labels, ref_top)])),
        "top5_quant": float(np.mean([y in row for y, row in zip(labels, cand_top)])),
        "top1_drop_pp": float((b - c) / n * 100.0),
        "top1_drop_ci95_pp": [lo, hi],
        "mcnemar": {"reference_only_correct": b, "candidate_only_correct": c, "p_value": mcnemar_exact(b, c),
                    "test": "exact two-sided binomial on discordant pairs"},
    }


def _per_true_class(labels, ref_pred, cand_pred, ref_ok, cand_ok, names: list[str]) -> dict[str, dict]:
    """With labels: per true class, both models' top-1, the drop and their agreement."""
    per_class: dict[str, dict] = {}
    for idx in np.unique(labels):
        mask = labels == idx
        t1f, t1q = float(np.mean(ref_ok[mask])), float(np.mean(cand_ok[mask]))
        per_class[names[idx]] = {"n": int(mask.sum()), "top1_float": t1f, "top1_quant": t1q,
                                 "drop_pp": (t1f - t1q) * 100.0,
                                 "agreement": float(np.mean(ref_pred[mask] == cand_pred[mask]))}
    return per_class


def confusion_change(ref_pred: np.ndarray, cand_pred: np.ndarray, labels: np.ndarray | None,
                     classes: int) -> dict:
    """Labeled: confusion(candidate) - confusion(reference). Unlabeled: reference -> candidate prediction moves."""
    if labels is None:
        m = np.zeros((classes, classes), dtype=np.int64)
        np.add.at(m, (ref_pred, cand_pred), 1)
        np.fill_diagonal(m, 0)
        return {"kind": "prediction moves (rows: reference, columns: candidate)", "matrix": m.tolist()}
    before = np.zeros((classes, classes), dtype=np.int64)
    after = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(before, (labels, ref_pred), 1)
    np.add.at(after, (labels, cand_pred), 1)
    return {"kind": "confusion change (rows: true, columns: predicted; candidate - reference)",
            "matrix": (after - before).tolist()}


def histogram(values: np.ndarray, bins: int = 20) -> dict:
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    return {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()}

"""Initialising from a local weights file (e.g. Keras's ImageNet Xception), matched by order.

Keras's Xception leaves its residual convolutions unnamed (``conv2d_17``),
so names cannot be matched; ``build_xception`` keeps Keras's layer order and
shapes instead, and the arrays are assigned in order, each shape checked. The
classifier is skipped when the class count differs (fine-tuning on new classes).
Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.core.errors import ModelLoadError, Remedy, TrainingError
from pipeline.model.modelio import load_source


def _legacy_h5_arrays(f) -> list[np.ndarray] | None:
    """Arrays of a tf_keras/Keras 2 ``.h5`` (whole model or weights only), in layer order."""
    group = f["model_weights"] if "model_weights" in f else f
    names = group.attrs.get("layer_names")
    if names is None:
        return None
    arrays = []
    for layer in names:
        layer = layer.decode() if isinstance(layer, bytes) else layer
        g = group[layer]
        for w in g.attrs.get("weight_names", []):
            w = w.decode() if isinstance(w, bytes) else w
            arrays.append(np.asarray(g[w]))
    return arrays


def _keras3_arrays(path: Path) -> list[np.ndarray]:
    """A Keras 3 ``.weights.h5`` stores layers by name in sorted groups; load it into Keras's own model."""
    import keras

    errors = []
    for include_top in (True, False):
        reference = keras.applications.Xception(weights=None, include_top=include_top, input_shape=(299, 299, 3))
        try:
            reference.load_weights(path)
            return [np.asarray(w) for w in reference.get_weights()]
        except Exception as exc:  # noqa: BLE001 - Keras raises many types for a mismatched file
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    raise TrainingError(f"{path} is not a keras.applications.Xception weights file ({'; '.join(errors)})")


def _model_file_arrays(path: Path) -> list[np.ndarray]:
    """A whole model (e.g. an earlier run's ``model.keras``): its layers' arrays in order."""

    try:
        source = load_source(path)
    except ModelLoadError as exc:
        raise TrainingError(f"cannot use {path} as initial weights: {exc}") from None
    if source.model is None:
        raise TrainingError(f"{path} is a SavedModel; pass a .keras, .h5 or .weights.h5 file")
    return [np.asarray(w) for layer in source.model.layers for w in layer.get_weights()]


def read_arrays(path: str | os.PathLike) -> list[np.ndarray]:
    import h5py

    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"weights file not found: {path}")
    if path.suffix.lower() == ".keras":
        return _model_file_arrays(path)
    try:
        with h5py.File(path, "r") as f:
            arrays = _legacy_h5_arrays(f)
    except OSError as exc:
        raise TrainingError(f"{path} is not an HDF5 weights file ({exc})") from None
    return arrays if arrays is not None else _keras3_arrays(path)


def load_by_order(model, path: str | os.PathLike) -> dict:
    """Assign the file's arrays to ``model`` in order; return what was loaded and skipped."""
    arrays = read_arrays(path)
    targets = [w for layer in model.layers for w in layer.weights]
    head = model.get_layer("predictions")
    head_ids = {id(w) for w in head.weights}
    body = [w for w in targets if id(w) not in head_ids]
    if len(arrays) < len(body):
        raise TrainingError(f"{path} holds {len(arrays)} arrays but the model's feature layers need {len(body)}; "
                            "the file is for an Xception of another shape", remedy=Remedy.SAME_ARCHITECTURE)
    for i, (var, value) in enumerate(zip(body, arrays)):
        if tuple(var.shape) != value.shape:
            raise TrainingError(f"{path}: array {i} has shape {value.shape}, the model's {var.path} needs "
                                f"{tuple(var.shape)}; the file is for an Xception of another shape",
                                remedy=Remedy.SAME_ARCHITECTURE)
        var.assign(value)
    rest = arrays[len(body):]
    head_loaded = (len(rest) == len(head.weights)
                   and all(tuple(v.shape) == a.shape for v, a in zip(head.weights, rest)))
    if head_loaded:
        for var, value in zip(head.weights, rest):
            var.assign(value)
    return {"file": str(path), "arrays": len(arrays), "loaded": len(body) + (len(rest) if head_loaded else 0),
            "classifier": "loaded" if head_loaded else "skipped (class count differs or absent)"}

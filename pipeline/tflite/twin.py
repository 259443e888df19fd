"""The float model an integer model was quantized from, so that their tensors can be paired by name.

Why: the per-layer report compares each int8 op output with the float tensor
of the same name. The int8 route may quantize a rewritten float model, not
the converted one: the scale fold (always, where it finds work) renames the
outputs it rescales, and cross-layer equalization (``--equalize``) renames the
middle tensor of each pair it balances (``equalize.SUFFIX``), since those hold
per-channel rescaled values. Both rewrites are deterministic functions of
the float model's weights, so the same rewrites of the reference's float
model give back the model the candidate was quantized from, names and all;
which ones apply is read from the names the candidate carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pipeline.tflite import flatbuffers
from pipeline.tflite.equalize import SUFFIX, equalize
from pipeline.tflite.flatbuffers import text
from pipeline.tflite.scale_fold import fold_scales


@dataclass(frozen=True)
class Twin:
    model: bytes
    folded: bool  # the scale fold, as the int8 route applies it
    equalized: bool  # cross-layer equalization: the balanced middle tensors pair too


def tensor_names(model_bytes: bytes) -> set[str]:
    graph = flatbuffers.schema().Model.GetRootAs(model_bytes, 0).Subgraphs(0)
    return {text(graph.Tensors(i).Name()) for i in range(graph.TensorsLength())}


def float_twin(float_model: bytes, quantized: bytes) -> Twin:
    """``float_model`` itself, its fold, or the fold equalized: whichever carries the names only that rewrite gives
    and ``quantized`` carries too."""
    carried = tensor_names(quantized)
    base, folded = float_model, False
    rewritten = _rewritten(fold_scales, float_model)
    if rewritten is not None and (tensor_names(rewritten) - tensor_names(float_model)) & carried:
        base, folded = rewritten, True
    if not any(name.endswith(SUFFIX) for name in carried):
        return Twin(base, folded, False)
    equalized = _rewritten(equalize, base)
    if equalized is not None and {name for name in tensor_names(equalized) if name.endswith(SUFFIX)} & carried:
        return Twin(equalized, folded, True)
    return Twin(base, folded, False)


def _rewritten(rewrite: Callable[[bytes], tuple[bytes, Any]], model: bytes) -> bytes | None:
    """``rewrite(model)``'s bytes; None where it cannot read the graph. The int8 route then converts the model
    unrewritten too (``routes._exact_rewrite``), so the plain model is the twin."""
    try:
        return rewrite(model)[0]
    except Exception:  # noqa: BLE001 - any reader error of either rewrite, as the conversion tolerates it
        return None

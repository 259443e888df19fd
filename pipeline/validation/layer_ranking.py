"""Which layers of a quantized model are worth keeping in float: ranked by the error each one adds.

Per-layer error accumulates through the network, so a layer's own RMSE says
little; the error it *adds* over the worst of its inputs points at the few
layers where the error jumps, which are the candidates a budget search
measures.
"""

from __future__ import annotations

from pipeline.tflite.runtime import graph_ops, open_interpreter
from pipeline.validation.layer_error import layer_errors


def rank_layers(float_bytes: bytes, quant_bytes: bytes, inputs, exclude=()) -> list[dict]:
    """Layers by the error each one *adds* (its RMSE/scale minus the worst of its inputs'), worst first."""

    errors = layer_errors(float_bytes, quant_bytes, inputs)
    by_tensor = {e.tensor: e for e in errors}
    interpreter = open_interpreter(quant_bytes)  # names and op wiring only; nothing runs
    names = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    scores: dict[str, dict] = {}
    for op in graph_ops(interpreter, quant_bytes):
        upstream = [by_tensor[names[int(i)]].rmse_over_scale for i in op["inputs"]
                    if int(i) >= 0 and names.get(int(i)) in by_tensor]
        for index in op["outputs"]:
            name = names.get(int(index))
            entry = by_tensor.get(name) if name is not None else None
            if entry is None or not entry.fused or entry.layer in exclude:  # "Identity": no layer to name
                continue
            added = entry.rmse_over_scale - max(upstream, default=0.0)
            best = scores.get(entry.layer)
            if best is None or added > best["added_error"]:
                scores[entry.layer] = {"layer": entry.layer, "op": entry.op, "added_error": round(added, 4),
                                       "rmse_over_scale": round(entry.rmse_over_scale, 4)}
    return sorted(scores.values(), key=lambda s: -s["added_error"])


__all__ = ["rank_layers"]

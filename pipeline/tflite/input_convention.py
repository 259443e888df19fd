"""Which input convention a .tflite takes, read from the model itself wherever it says so.

The one place that answers "how do I feed this model decoded pixels?" for
validation, the accuracy search, sweep, parity and the device bench. In
order, the first that speaks decides:

1. an 8-bit input tensor's quantization: uint8 at scale 1 and zero point 0
   is ``pixels``, int8 at scale 1 and zero point -128 is ``pixels_int8`` (a
   [-1, 1] input is never quantized that way), any other ``signed_unit``; a
   float32 input quantized to 8 bits by its first op says the same through
   that QUANTIZE;
2. a float input's NormalizationOptions metadata: mean 0 / std 1 is
   ``pixels``, mean 127.5 / std 127.5 ``signed_unit``;
3. the manifest beside the model (``preprocessing.input_convention``; a
   manifest from before conventions existed means ``signed_unit``);
4. nothing: ``signed_unit``, what every model before conventions took.

``devices/runner.py`` repeats steps 1, 3 and 4 (it imports nothing from the
project) and takes ``--input-convention`` from the host for the rest.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core import artifacts
from pipeline.core.errors import ArtifactError, ModelLoadError
from pipeline.core.preprocessing import LEGACY_CONVENTION, PIXEL_TENSORS, normalization, recorded_convention
from pipeline.tflite import flatbuffers
from pipeline.tflite.metadata import read_metadata

_FLOAT = ("float32", "float16")
_BY_TENSOR = {(dtype, scale, zero): name for name, (dtype, scale, zero) in PIXEL_TENSORS.items()}


def _quantization(tensor) -> tuple[str, float, int]:
    """(dtype name, scale, zero point) of a flatbuffer tensor (object API)."""
    q = tensor.quantization
    scale = float(q.scale[0]) if q is not None and q.scale is not None and len(q.scale) else 0.0
    zero = int(q.zeroPoint[0]) if q is not None and q.zeroPoint is not None and len(q.zeroPoint) else 0
    return flatbuffers.type_names().get(tensor.type, "?").lower(), scale, zero


def _by_quantization(dtype: str, scale: float, zero: int) -> str:
    return _BY_TENSOR.get((dtype, scale, zero), LEGACY_CONVENTION)


def tensor_convention(model_bytes: bytes) -> str | None:
    """What the input tensor's quantization states (step 1 of the module docstring), or None."""
    model = flatbuffers.read(model_bytes)
    graph = model.subgraphs[0]
    index = int(graph.inputs[0])
    dtype, scale, zero = _quantization(graph.tensors[index])
    if dtype in ("int8", "uint8"):
        return _by_quantization(dtype, scale, zero)
    if dtype not in _FLOAT:
        return None
    for op in graph.operators or []:
        if op.inputs is None or index not in [int(i) for i in op.inputs]:
            continue
        if flatbuffers.op_name(model, op) != "QUANTIZE":
            return None
        dtype, scale, zero = _quantization(graph.tensors[int(op.outputs[0])])
        if dtype not in ("int8", "uint8"):
            return None
        return "pixels" if (dtype, scale, zero) in _BY_TENSOR else LEGACY_CONVENTION
    return None


def metadata_convention(model_bytes: bytes) -> str | None:
    """What a float input's NormalizationOptions metadata states (step 2), or None."""
    try:
        meta = read_metadata(model_bytes)
    except Exception:  # noqa: BLE001 - foreign metadata must not stop a model from being fed
        return None
    try:
        unit = meta.subgraphMetadata[0].inputTensorMetadata[0].processUnits[0]
        mean, std = list(unit.options.mean), list(unit.options.std)
    except (AttributeError, IndexError, TypeError):
        return None
    for convention in ("pixels", LEGACY_CONVENTION):
        m, s = normalization(convention)
        if mean and all(v == m for v in mean) and std and all(v == s for v in std):
            return convention
    return None


def model_convention(model_bytes: bytes, manifest: dict | None = None) -> tuple[str, str]:
    """(input convention, where it was read) of a .tflite, as the module docstring orders it.

    A manifest that records a convention the model's own input contradicts is
    refused: one of the two is not what it claims.
    """
    recorded = (manifest or {}).get("preprocessing") or {}
    for stated, where in ((tensor_convention(model_bytes), "input tensor quantization"),
                          (metadata_convention(model_bytes), "NormalizationOptions metadata")):
        if stated is None:
            continue
        if "input_convention" in recorded and recorded_convention(recorded) != stated:
            raise ModelLoadError(f"the manifest records {recorded['input_convention']} input but the model's "
                                 f"{where} says {stated}")
        return stated, where
    if manifest is not None:
        return recorded_convention(recorded), ("manifest" if "input_convention" in recorded
                                               else "manifest from before input conventions")
    return LEGACY_CONVENTION, "assumed: a float input, no metadata or manifest says otherwise"


def manifest_beside(path: str | Path, model_bytes: bytes | None = None) -> dict | None:
    """The manifest written beside a model, or None (missing or unreadable: the model itself still speaks).

    Given the model's bytes, the record that names them (``artifacts.describing``:
    while a write is between its renames, the manifest of the pair being replaced).
    """
    manifest = artifacts.manifest_path_for(path)
    if not manifest.is_file():
        return None
    try:
        found = artifacts.read_manifest(manifest)
    except ArtifactError:
        return None
    return found if model_bytes is None else artifacts.describing(found, model_bytes)


def file_convention(path: str | Path, model_bytes: bytes | None = None) -> tuple[str, str]:
    """``model_convention`` of the .tflite at ``path``, with the manifest beside it."""
    data = Path(path).read_bytes() if model_bytes is None else model_bytes
    return model_convention(data, manifest_beside(path, data))

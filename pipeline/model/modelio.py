"""Loading the models users bring: Keras 3 ``.keras``, tf_keras ``.keras``/``.h5``, SavedModel.

Model files come from colleagues and the internet, so nothing in them runs:
configurations are read as JSON first and a Lambda layer (pickled Python
bytecode) or any custom class is refused before Keras sees the file, unless
the caller passes ``trust_code=True``. Keras 3's own ``safe_mode`` is kept
on as a second line; tf_keras ignores ``safe_mode`` for ``.h5`` files, which
is why the check here does not rely on it.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import ModelLoadError

TRUST_HINT = "pass --trust-model-code only if you trust whoever made this file"
# Layers whose configuration carries executable Python.
_CODE_LAYERS = {"Lambda"}


@dataclass
class SourceModel:
    """A float model ready for conversion or evaluation."""

    path: Path
    kind: str  # "keras3" | "tf_keras" | "saved_model" | "tflite" (a float32 .tflite, to quantize)
    model: object | None  # the Keras model; None for a SavedModel or a .tflite
    input_shape: tuple  # (H, W, C)
    classes: int
    # Conversion stages already computed for this model (pipeline.conversion.export: the float .tflite, its calibration)
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def input_size(self) -> int:
        return int(self.input_shape[0])


def _keras_zip_meta(path: Path) -> tuple[dict, dict]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "config.json" not in names:
                raise ModelLoadError(f"{path} is not a Keras model archive (no config.json inside)")
            meta = json.loads(zf.read("metadata.json")) if "metadata.json" in names else {}
            config = json.loads(zf.read("config.json"))
            return meta, config
    except zipfile.BadZipFile:
        raise ModelLoadError(f"{path} is not a valid .keras file (not a zip archive)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} has an unreadable configuration ({exc})") from None


def _h5_config(path: Path) -> dict:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
    except OSError as exc:
        raise ModelLoadError(f"{path} is not a valid HDF5 model file ({exc})") from None
    if raw is None:
        raise ModelLoadError(f"{path} holds weights only (no model_config); build the model and load weights instead")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} has an unreadable model_config ({exc})") from None


def code_carrying_layers(config) -> list[str]:
    """Names of layers in a Keras config whose deserialization would run Python code."""
    found: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            cls = node.get("class_name")
            if cls in _CODE_LAYERS or (isinstance(node.get("config"), dict) and "function" in node["config"]
                                       and cls not in (None, "Activation")):
                name = node.get("config", {}).get("name") if isinstance(node.get("config"), dict) else None
                found.append(f"{cls} layer {name!r}" if name else str(cls))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found


def _refuse_code(path: Path, config, trust_code: bool) -> None:
    if trust_code:
        return
    layers = code_carrying_layers(config)
    if layers:
        raise ModelLoadError(f"{path} contains code ({', '.join(layers[:3])}) that would run when loaded; "
                             f"refused. {TRUST_HINT}")


def detect_kind(path: Path) -> str:
    if path.is_dir():
        if (path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists():
            return "saved_model"
        raise ModelLoadError(f"{path} is a folder but not a SavedModel (no saved_model.pb)")
    suffix = path.suffix.lower()
    if suffix == ".keras":
        meta, _ = _keras_zip_meta(path)
        version = str(meta.get("keras_version", ""))
        return "tf_keras" if version.startswith("2.") else "keras3"
    if suffix in (".h5", ".hdf5"):
        return "tf_keras"
    if suffix == ".tflite":
        return "tflite"
    raise ModelLoadError(f"unsupported model file {path}: expected a SavedModel folder, .keras, .h5 or a float "
                         ".tflite")


def _shape_of(model) -> tuple[tuple, int]:
    inputs = model.inputs
    if len(inputs) != 1:
        raise ModelLoadError(f"expected a model with one image input, got {len(inputs)} inputs")
    shape = tuple(inputs[0].shape)[1:]
    if len(shape) != 3 or shape[2] != 3 or shape[0] is None or shape[0] != shape[1]:
        raise ModelLoadError(f"expected a square RGB image input (H, H, 3), got {shape}")
    outputs = model.outputs
    if len(outputs) != 1 or len(outputs[0].shape) != 2:
        raise ModelLoadError("expected one (batch, classes) output")
    return tuple(int(s) for s in shape), int(outputs[0].shape[-1])


def _saved_model_shape(path: Path) -> tuple[tuple, int]:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:  # noqa: BLE001 - TF raises many types for a bad SavedModel
        raise ModelLoadError(f"cannot load SavedModel {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    sig = loaded.signatures.get("serving_default")
    if sig is None:
        raise ModelLoadError(f"SavedModel {path} has no serving_default signature")
    specs = list(sig.structured_input_signature[1].values())
    outs = list(sig.structured_outputs.values())
    if len(specs) != 1 or len(outs) != 1:
        raise ModelLoadError(f"SavedModel {path} must have one input and one output in serving_default")
    shape = tuple(specs[0].shape)[1:]
    if len(shape) != 3 or shape[0] is None or shape[0] != shape[1] or shape[2] != 3:
        raise ModelLoadError(f"SavedModel {path} input must be (batch, H, H, 3), got {tuple(specs[0].shape)}")
    return tuple(int(s) for s in shape), int(outs[0].shape[-1])


_QUANTIZE_CLASSES = ("QuantizeLayer", "QuantizeWrapper", "QuantizeWrapperV2")


def _is_quantized_config(config) -> bool:
    return any(f'"{name}"' in json.dumps(config) for name in _QUANTIZE_CLASSES)


def _quantize_scope():
    from pipeline.model.tfmot_import import import_tfmot

    return import_tfmot().quantization.keras.quantize_scope()


def load_source(path: str | os.PathLike, *, trust_code: bool = False) -> SourceModel:
    """Load a float model for conversion or evaluation, refusing embedded code."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model not found: {path}")
    kind = detect_kind(path)
    if kind == "tflite":
        return _float_tflite_source(path)
    if kind == "saved_model":
        shape, classes = _saved_model_shape(path)
        return SourceModel(path, kind, None, shape, classes)
    if path.suffix.lower() == ".keras":
        _, config = _keras_zip_meta(path)
    else:
        config = _h5_config(path)
    _refuse_code(path, config, trust_code)
    try:
        if kind == "keras3":
            import keras

            model = keras.saving.load_model(path, compile=False, safe_mode=not trust_code)
        else:
            import contextlib

            import tf_keras

            kwargs = {} if path.suffix.lower() != ".keras" else {"safe_mode": not trust_code}
            # Quantization-aware models (``xedge qat``) hold tfmot's wrapper layers, known only in its scope.
            scope = _quantize_scope() if _is_quantized_config(config) else contextlib.nullcontext()
            with scope:
                model = tf_keras.models.load_model(path, compile=False, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a bad file
        raise ModelLoadError(f"cannot load {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    shape, classes = _shape_of(model)
    return SourceModel(path, kind, model, shape, classes)


def _float_tflite_source(path: Path) -> SourceModel:
    """A float32 .tflite to quantize. Nobody vouched for it, so it is first loaded and run in a sandboxed
    child (``pipeline.tflite.safe_tflite``); that probe runs while the caller reads its calibration images, and
    ``pipeline.conversion.export.float_tflite`` waits for it before anything loads the model in this process. Its
    shapes and tensor types are read here from the flatbuffer, in Python, without executing anything."""
    from pipeline.tflite.safe_tflite import check_manifest, read_model_bytes, start_probe

    data = read_model_bytes(path)
    check_manifest(path, data)
    pending = start_probe(data, str(path))
    try:
        inputs, outputs, quantized = _tflite_signature(data)
    except ModelLoadError:
        raise
    except Exception:  # noqa: BLE001 - a malformed flatbuffer: let the probe say what is wrong with it
        pending.result()
        raise ModelLoadError(f"invalid model: cannot read the tensors of {path}") from None
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelLoadError(f"expected a .tflite with one image input and one output, got {len(inputs)} inputs "
                             f"and {len(outputs)} outputs")
    shape, out_shape = inputs[0], outputs[0]
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
        raise ModelLoadError(f"expected a square RGB image input (1, H, H, 3) in {path.name}, got {tuple(shape)}")
    if len(out_shape) != 2:
        raise ModelLoadError(f"expected a (1, classes) output in {path.name}, got {tuple(out_shape)}")
    if quantized:
        raise ModelLoadError(f"{path.name} is already quantized ({len(quantized)} integer tensors, e.g. "
                             f"{quantized[0]}); quantize from the float32 .tflite or the Keras model")
    source = SourceModel(path, "tflite", None, tuple(shape[1:]), int(out_shape[1]))
    source.cache["unverified_tflite"] = (data, pending)
    return source


def _tflite_signature(data: bytes) -> tuple[list, list, list[str]]:
    """Input shapes, output shapes and the names of quantized integer tensors, read in place."""
    from pipeline.tflite import flatbuffers
    schema = flatbuffers.schema()
    model = schema.Model.GetRootAs(data, 0)
    if model.SubgraphsLength() < 1:
        raise ModelLoadError("invalid model: the .tflite has no graph")
    graph = model.Subgraphs(0)
    integer = {schema.TensorType.INT8, schema.TensorType.UINT8, schema.TensorType.INT16}

    def shape(index: int) -> list[int]:
        return [int(d) for d in graph.Tensors(index).ShapeAsNumpy()] if graph.Tensors(index).ShapeLength() else []

    quantized = []
    for k in range(graph.TensorsLength()):
        tensor = graph.Tensors(k)
        q = tensor.Quantization()
        if tensor.Type() in integer and q is not None and q.ScaleLength():
            quantized.append(tensor.Name().decode("utf-8", "replace"))
    return ([shape(int(i)) for i in graph.InputsAsNumpy()], [shape(int(i)) for i in graph.OutputsAsNumpy()],
            quantized)

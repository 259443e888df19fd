"""Loading the models users bring: Keras 3 ``.keras``, tf_keras ``.keras``/``.h5``, SavedModel, float ``.tflite``.

Model files come from colleagues and the internet, and TensorFlow's security
guidance says it plainly: models are programs. Without ``trust_code=True``:

* Keras files: the configuration is read as JSON first, and every object it
  names (nested to any depth) must be on ``keras_allowlist``'s list of Keras's
  own classes that hold numbers and settings only; anything else (Lambda,
  TFSMLayer, tf_keras's ReloadedLayer, custom objects, unknown modules) is
  refused before Keras imports or builds anything: tf_keras imports whatever
  module a configuration names, and ignores ``safe_mode`` for ``.h5``. Keras
  3's own ``safe_mode`` stays on as a second line. The weights are numbers
  and run nothing.
* SavedModels: validation and the rewrite check execute the signature, and
  loading one runs its resource initializers, so its graph is a program. Its
  ops are checked (``pipeline.model.saved_model_ops``) before TensorFlow
  loads it; anything outside the safe list (ReadFile, WriteFile, PyFunc,
  PrintV2, lookup tables, datasets, ...) is refused, naming the ops.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import ModelLoadError, Remedy
from pipeline.model.keras_allowlist import disallowed_objects
from pipeline.model.flatten import flatten, nested_models
from pipeline.model.saved_model_ops import unsafe_saved_model_ops
from pipeline.model.stem import Stem
from pipeline.model.tfmot_import import import_tfmot
from pipeline.tflite import flatbuffers
from pipeline.tflite.sandboxed_load import Probe, check_manifest, read_model_bytes, start_probe
from pipeline.tflite.equalize import EqualizeReport
from pipeline.tflite.scale_fold import FoldReport
from pipeline.tflite.weighted_layers import InputSums

# The largest input side accepted: every calibration and evaluation image is held decoded at the model's size
# (64 uint8 samples of 2048x2048x3 are 805 MB); image classifiers take 224 to 600.
MAX_INPUT_SIZE = 2048
# A Keras configuration is JSON of a few kilobytes per layer; past this it is not a model a user made.
MAX_KERAS_CONFIG_BYTES = 64 * 2**20


@dataclass(frozen=True)
class KeptCalibration:
    """A calibrated float model and what made it, reused while the same calibration set and method are asked for
    (``pipeline.conversion.routes``: the staged int8 route)."""

    samples: object  # the calibration set it ran on, compared by identity
    method: tuple[str, ...]  # (calibrator, ranges, whether its scales were folded, whether it was equalized)
    model: bytes  # the float .tflite with its activation ranges recorded
    record: Any  # the conversion stage's CalibrationRecord of that run (a later stage's type)
    # The float inputs of the weighted layers summed over the same images in the same pass (bias correction's
    # float means), or None where they were not asked for or the stock calibrator ran.
    float_sums: InputSums | None = None


@dataclass
class SourceCache:
    """What conversions already worked out for one loaded model, so that each is done once per model.

    Filled by the conversion stage (``pipeline.conversion``), which reads it
    back; every field starts empty (``None``) but ``inlined_models``, which
    the loader fills.
    """

    # The sandboxed probe of a .tflite source still running, with the bytes it checks: nothing loads them in
    # this process before the probe passed (``pipeline.conversion.routes.float_tflite`` waits for it).
    unverified_tflite: tuple[bytes, Probe] | None = None
    # The source as a float32 .tflite (a .tflite source: its own bytes, once its probe passed).
    float_tflite: bytes | None = None
    # The float32 .tflite with per-channel scales after a ReLU folded into the layer before, and what was folded:
    # what the staged int8 route calibrates and quantizes (``pipeline.conversion.routes.int8_float_model``).
    scale_folded: tuple[bytes, FoldReport | str, float] | None = None  # a str: why the model is unfolded; seconds
    # That model with its layer pairs equalized (``pipeline.tflite.equalize``), when a conversion asked for it, and
    # the seconds equalizing took.
    equalized: tuple[bytes, EqualizeReport | str, float] | None = None  # a str: why it is not equalized
    # The last calibration of the staged int8 route.
    calibrated: KeptCalibration | None = None
    # What the float input holds: "pixels" or "signed_unit" (``convention_choice.source_domain``).
    domain: str | None = None
    # The stem the input scaling folds into, or why it cannot be folded (``convention_choice.stem_of``).
    stem: Stem | str | None = None
    # This model with its input scaling folded into the stem (pixel input), made once.
    folded: SourceModel | None = None
    # On a folded model: the model it was folded from.
    unfolded: SourceModel | None = None
    # Names of the nested Keras models inlined when loading (``pipeline.model.flatten``), for the manifest.
    inlined_models: list[str] = field(default_factory=list)
    # Seconds ``load_source`` took, until a conversion's timing claims them (once: later ones did not load it).
    load_s: float | None = None


@dataclass
class SourceModel:
    """A float model ready for conversion or evaluation."""

    path: Path
    kind: str  # "keras3" | "tf_keras" | "saved_model" | "tflite" (a float32 .tflite, to quantize)
    model: Any  # the Keras model (untyped library: Any); None for a SavedModel or a .tflite
    input_shape: tuple  # (H, W, C)
    classes: int
    # Conversion stages already computed for this model: the float .tflite, its calibration, the folded stem
    cache: SourceCache = field(default_factory=SourceCache, repr=False, compare=False)

    @property
    def input_size(self) -> int:
        return int(self.input_shape[0])


def _keras_zip_meta(path: Path) -> tuple[dict, dict]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [info.filename for info in zf.infolist()]
            if "config.json" not in names:
                raise ModelLoadError(f"{path} is not a Keras model archive (no config.json inside)")
            for entry in ("config.json", "metadata.json"):
                if names.count(entry) > 1:  # which copy a loader reads is its own choice: refuse the ambiguity
                    raise ModelLoadError(f"{path} holds {entry} twice; refused")
                if entry in names and zf.getinfo(entry).file_size > MAX_KERAS_CONFIG_BYTES:
                    raise ModelLoadError(f"{path} has a {entry} over {MAX_KERAS_CONFIG_BYTES >> 20} MiB; refused")
            meta = json.loads(zf.read("metadata.json")) if "metadata.json" in names else {}
            config = json.loads(zf.read("config.json"))
    except zipfile.BadZipFile:
        raise ModelLoadError(f"{path} is not a valid .keras file (not a zip archive)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError, OSError, EOFError,
            NotImplementedError, RuntimeError, zlib.error, struct.error, KeyError) as exc:  # damaged, encrypted
        raise ModelLoadError(f"{path} has an unreadable configuration ({type(exc).__name__}: "
                             f"{str(exc)[:120]})") from None
    if not isinstance(meta, dict) or not isinstance(config, dict):
        raise ModelLoadError(f"{path} has an unreadable configuration (not a JSON object)")
    return meta, config


def _h5_config(path: Path) -> dict:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
    except OSError as exc:
        raise ModelLoadError(f"{path} is not a valid HDF5 model file ({exc})") from None
    if raw is None:
        raise ModelLoadError(f"{path} holds weights only (no model_config); build the model and load weights instead")
    try:
        config = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"{path} has an unreadable model_config ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} has an unreadable model_config (not a JSON object)")
    return config


def _h5_keras_version(path: Path) -> str:
    """The Keras version an .h5 model file was saved by ("" when unknown): Keras 3 writes .h5 files too."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            version = f.attrs.get("keras_version", "")
    except OSError:
        return ""  # not HDF5: _h5_config says so in its own words
    return version.decode("utf-8", "replace") if isinstance(version, bytes) else str(version)


def _refuse_code(path: Path, config, trust_code: bool) -> None:
    if trust_code:
        return
    found = disallowed_objects(config)
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise ModelLoadError(f"{path} names objects outside Keras's own layers, initializers, regularizers, "
                             f"constraints, activations and dtype policies ({', '.join(found[:3])}{more}); they "
                             f"could run code when loaded; refused", remedy=Remedy.TRUST_CODE)




def _refuse_unsafe_ops(path: Path, trust_code: bool) -> None:
    if trust_code:
        return
    unsafe = unsafe_saved_model_ops(path)
    if unsafe:
        ops = ", ".join(f"{op} (in {where[0]})" for op, where in list(unsafe.items())[:4])
        more = f" and {len(unsafe) - 4} more" if len(unsafe) > 4 else ""
        raise ModelLoadError(f"SavedModel {path} holds TensorFlow ops outside the safe list (tensor maths only; "
                             f"no file, network or Python ops): {ops}{more}; refused before loading",
                             remedy=Remedy.TRUST_CODE)


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
        return "keras3" if _h5_keras_version(path).startswith("3.") else "tf_keras"
    if suffix == ".tflite":
        return "tflite"
    raise ModelLoadError(f"unsupported model file {path}: expected a SavedModel folder, .keras, .h5 or a float "
                         ".tflite")


def _size_refusal(what, side: int) -> str:
    return (f"{what} takes {side}x{side} images; the tool handles inputs from 1 to {MAX_INPUT_SIZE} pixels a side "
            f"(each calibration and evaluation image is held at that size)")


def _shape_of(model) -> tuple[tuple, int]:
    inputs = model.inputs
    if len(inputs) != 1:
        raise ModelLoadError(f"expected a model with one image input, got {len(inputs)} inputs")
    shape = tuple(inputs[0].shape)[1:]
    if len(shape) != 3 or shape[2] != 3 or shape[0] is None or shape[0] != shape[1]:
        raise ModelLoadError(f"expected a square RGB image input (H, H, 3), got {shape}")
    if not 1 <= shape[0] <= MAX_INPUT_SIZE:
        raise ModelLoadError(_size_refusal("the model", shape[0]))
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
    if not 1 <= shape[0] <= MAX_INPUT_SIZE:
        raise ModelLoadError(_size_refusal(path, shape[0]))
    return tuple(int(s) for s in shape), int(outs[0].shape[-1])


_QUANTIZE_CLASSES = ("QuantizeLayer", "QuantizeWrapper", "QuantizeWrapperV2")


def _is_quantized_config(config) -> bool:
    return any(f'"{name}"' in json.dumps(config) for name in _QUANTIZE_CLASSES)


def _quantize_scope():
    return import_tfmot().quantization.keras.quantize_scope()


def load_source(path: str | os.PathLike, *, trust_code: bool = False) -> SourceModel:
    """Load a float model for conversion or evaluation, refusing embedded code.

    The seconds it took are kept (``SourceCache.load_s``): a caller that loads the
    model before converting it (the CLI, to size the calibration images) still
    gets the load in the conversion's stage timings."""
    started = time.perf_counter()
    source = _load(Path(path), trust_code)
    source.cache.load_s = time.perf_counter() - started
    return source


def _load(path: Path, trust_code: bool) -> SourceModel:
    if not path.exists():
        raise ModelLoadError(f"model not found: {path}")
    kind = detect_kind(path)
    if kind == "tflite":
        return _float_tflite_source(path)
    if kind == "saved_model":
        _refuse_unsafe_ops(path, trust_code)
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
    inlined = nested_models(model)
    source = SourceModel(path, kind, flatten(model) if inlined else model, shape, classes)
    if inlined:  # pipeline.model.flatten: the base network's layers keep their names through conversion
        source.cache.inlined_models = inlined
    return source


def _float_tflite_source(path: Path) -> SourceModel:
    """A float32 .tflite to quantize. Nobody vouched for it, so it is first loaded and run in a sandboxed
    child (``pipeline.tflite.sandboxed_load``); that probe runs while the caller reads its calibration images, and
    ``pipeline.conversion.routes.float_tflite`` waits for it before anything loads the model in this process. Its
    shapes and tensor types are read here from the flatbuffer, in Python, without executing anything."""

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
    if not 1 <= shape[1] <= MAX_INPUT_SIZE:
        pending.result()  # a malformed model says so through the probe first; a sound one gets the size refusal
        raise ModelLoadError(_size_refusal(path, shape[1]))
    if len(out_shape) != 2:
        raise ModelLoadError(f"expected a (1, classes) output in {path.name}, got {tuple(out_shape)}")
    if quantized:
        raise ModelLoadError(f"{path.name} is already quantized ({len(quantized)} integer tensors, e.g. "
                             f"{quantized[0]}); quantize from the float32 .tflite or the Keras model")
    source = SourceModel(path, "tflite", None, tuple(shape[1:]), int(out_shape[1]))
    source.cache.unverified_tflite = (data, pending)
    return source


def _tflite_signature(data: bytes) -> tuple[list, list, list[str]]:
    """Input shapes, output shapes and the names of quantized integer tensors, read in place."""
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

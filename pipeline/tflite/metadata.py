"""Standard TFLite metadata and a ``serving_default`` signature, added to a finished .tflite.

Why: the standard on-device clients read how to feed a model and what its
outputs mean from the model itself. MediaPipe Tasks' ``ImageClassifier``
refuses a float32 input without NormalizationOptions metadata and names the
classes from the labels file packed with it; LiteRT's signature runners,
ai-edge-quantizer and ``litert quantize`` need a SignatureDef.

How: the metadata is built with the official metadata schema
(``pipeline/tflite/metadata_schema_py_generated.py``: MediaPipe 1.2.3's generated
module, verbatim; a test keeps it equal to the installed MediaPipe's) and the
flatbuffers package, and packed the way MediaPipe's and tflite-support's
``MetadataPopulator`` packs it: the metadata flatbuffer (identifier ``M001``)
in a model buffer named by the model's ``TFLITE_METADATA`` entry, the
associated files (``labels.txt``) as a zip archive appended to the model
flatbuffer. The populator itself cannot be used: its C++ extension does not
import from MediaPipe's wheel (``No module named 'mediapipe.tasks.cc'``),
tflite-support pins protobuf<4, and MediaPipe cannot be a dependency (it
needs absl-py 2, tensorflow-model-optimization 0.8 pins absl-py 1).
Two deliberate differences from the populator: the zip entries carry a fixed
timestamp, so the same model gives the same bytes, and an earlier metadata
entry is removed with its buffer rather than overwritten in place, so the
result does not depend on where a previous tool put it.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import dataclass

import flatbuffers as flatbuffers_lib
import numpy as np

from pipeline.core.errors import ConversionError, ModelLoadError
from pipeline.tflite import flatbuffers
from pipeline.tflite import metadata_schema_py_generated as md

METADATA_NAME = "TFLITE_METADATA"
METADATA_IDENTIFIER = b"M001"
LABELS_FILE = "labels.txt"
SIGNATURE_KEY = "serving_default"
INPUT_NAME = "image"
OUTPUT_NAME = "scores"
# The oldest metadata parser that reads every field written here (MediaPipe's
# metadata_version.cc: no field added after 1.0.0 is used).
MIN_PARSER_VERSION = "1.0.0"
MAX_ASSOCIATED_BYTES = 64 * 2**20  # a labels file; a zip claiming more is not one a converter packed
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can record; fixed so equal models give equal bytes


@dataclass(frozen=True)
class ModelInfo:
    """What the metadata says: ``(pixel - mean) / std`` is the float input, per channel or for all three."""

    name: str
    version: str
    description: str
    labels: tuple[str, ...] | None = None  # any sequence; stored as a tuple
    mean: tuple[float, ...] = (127.5,)  # one value (a float is taken too), or one per channel; stored as a tuple
    std: tuple[float, ...] = (127.5,)
    author: str = "xception-edge"

    def __post_init__(self):
        mean = (self.mean,) if isinstance(self.mean, (int, float)) else self.mean
        std = (self.std,) if isinstance(self.std, (int, float)) else self.std
        object.__setattr__(self, "mean", tuple(float(v) for v in mean))
        object.__setattr__(self, "std", tuple(float(v) for v in std))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
            raise ConversionError(f"normalization needs one mean and std, or three of each: got {len(self.mean)} "
                                  f"means and {len(self.std)} stds")
        if any(s == 0 for s in self.std):
            raise ConversionError("normalization std must not be 0")
        if self.labels is not None and any("\n" in label or "\r" in label for label in self.labels):
            raise ConversionError("a class name contains a line break; the labels file has one name per line")


def add_metadata(model_bytes: bytes, info: ModelInfo) -> bytes:
    """``model_bytes`` with ``info`` as its metadata (replacing any) and a serving signature if it has none."""
    schema = flatbuffers.schema()
    model = flatbuffers.read(model_bytes)  # the flatbuffer only: a zip appended earlier is dropped here
    graph = model.subgraphs[0]
    if len(model.subgraphs) != 1 or len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ConversionError(f"image classifier metadata needs one subgraph with one input and one output, got "
                              f"{len(model.subgraphs)} subgraph(s), {len(graph.inputs)} input(s), "
                              f"{len(graph.outputs)} output(s)")
    image, scores = graph.tensors[int(graph.inputs[0])], graph.tensors[int(graph.outputs[0])]
    classes = int(scores.shape[-1])
    if info.labels is not None and len(info.labels) != classes:
        raise ConversionError(f"{len(info.labels)} class names for a model with {classes} outputs")
    _remove_metadata(model)
    model.buffers.append(schema.BufferT())
    model.buffers[-1].data = np.frombuffer(_metadata_flatbuffer(info, image.type == schema.TensorType.FLOAT32,
                                                                image.type == schema.TensorType.UINT8), np.uint8)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    if not model.signatureDefs:
        model.signatureDefs = [_signature(schema, int(graph.inputs[0]), int(graph.outputs[0]))]
    out = io.BytesIO(flatbuffers.write(model))
    if info.labels is not None:
        with zipfile.ZipFile(out, "a") as archive:  # appended after the flatbuffer, as the populator does
            member = zipfile.ZipInfo(LABELS_FILE, date_time=_ZIP_DATE)
            member.create_system = 3
            archive.writestr(member, "".join(f"{label}\n" for label in info.labels))
    return out.getvalue()


def read_metadata(model_bytes: bytes):
    """The model's metadata as ``ModelMetadataT``, or None; ``ModelLoadError`` when it is malformed.

    Checked against the schema as it is read: the entry's buffer index and the buffer's bytes lie inside the
    model, every offset inside the metadata buffer (``_Bounded``), every string is UTF-8. Native parsers
    (MediaPipe's) trust these, so a model whose metadata fails here is never handed to one."""
    buffer = metadata_buffer(model_bytes)
    if buffer is None:
        return None
    try:
        meta = md.ModelMetadataT.InitFromObj(md.ModelMetadata.GetRootAsModelMetadata(_Bounded(buffer), 0))
        _check_strings(meta, depth=0)
    except (IndexError, struct.error, ValueError, TypeError, AttributeError, UnicodeDecodeError, OverflowError,
            RecursionError) as exc:
        raise ModelLoadError(f"invalid model: its {METADATA_NAME} metadata is malformed "
                             f"({type(exc).__name__}: {str(exc)[:100]})") from None
    return meta


class _Bounded(bytes):
    """Bytes whose slices must lie inside them. The flatbuffers package reads scalars with ``struct`` (which
    fails past the end) but slices strings and byte vectors, which past the end silently come back short."""

    def __getitem__(self, key):
        if isinstance(key, slice) and not 0 <= (key.start or 0) <= (len(self) if key.stop is None else key.stop) \
                <= len(self):
            raise IndexError(f"bytes {key.start}..{key.stop} lie outside the {len(self)}-byte buffer")
        return super().__getitem__(key)


def _check_strings(node, depth: int) -> None:
    """Every string of the metadata object tree decodes as UTF-8 (the clients read them as text)."""
    if depth > 32:
        raise RecursionError("metadata nested deeper than the schema allows")
    if isinstance(node, bytes):
        node.decode("utf-8")
    elif isinstance(node, list):
        for item in node:
            _check_strings(item, depth + 1)
    elif hasattr(node, "__dict__"):
        for value in vars(node).values():
            _check_strings(value, depth + 1)


def metadata_buffer(model_bytes: bytes) -> bytes | None:
    """The raw ``TFLITE_METADATA`` flatbuffer (None when there is none); ``ModelLoadError`` when an entry
    names a buffer the model does not have, or bytes outside the file."""
    try:
        model = flatbuffers.schema().Model.GetRootAs(model_bytes, 0)
        buffers = model.BuffersLength()
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            index = entry.Buffer()
            if not 0 <= index < buffers:
                raise ModelLoadError(f"invalid model: metadata entry {i} names buffer {index}, but the model has "
                                     f"{buffers} buffers")
            if entry.Name() in (METADATA_NAME.encode(), METADATA_NAME):
                return _buffer_bytes(model_bytes, model.Buffers(index))
    except (IndexError, struct.error, ValueError, TypeError, OverflowError) as exc:
        raise ModelLoadError(f"invalid model: its metadata entries are malformed ({type(exc).__name__})") from None
    return None


def _buffer_bytes(model_bytes: bytes, buffer) -> bytes | None:
    """A buffer's bytes: inline in the flatbuffer, or (models over 2 GiB) at an offset in the file."""
    offset, size = buffer.Offset(), buffer.Size()
    if offset > 1:
        if offset + size > len(model_bytes):
            raise ModelLoadError(f"invalid model: its metadata buffer ({size} bytes at {offset}) lies past the end "
                                 f"of the {len(model_bytes)}-byte file")
        return bytes(model_bytes[offset:offset + size])
    data = buffer.DataAsNumpy()  # numpy refuses a vector that runs past the end (ValueError)
    return None if isinstance(data, int) else data.tobytes()


def associated_files(model_bytes: bytes) -> dict[str, bytes]:
    """The files packed after the flatbuffer (name -> contents); {} when there are none."""
    try:
        with zipfile.ZipFile(io.BytesIO(model_bytes)) as archive:
            if sum(info.file_size for info in archive.infolist()) > MAX_ASSOCIATED_BYTES:
                raise ModelLoadError(f"invalid model: its packed files hold over {MAX_ASSOCIATED_BYTES >> 20} MiB")
            return {name: archive.read(name) for name in archive.namelist()}
    except zipfile.BadZipFile:
        return {}
    except (NotImplementedError, RuntimeError, ValueError, EOFError, OSError, zlib.error, UnicodeDecodeError,
            struct.error) as exc:  # a zip that is there but damaged, encrypted or of an unknown version
        raise ModelLoadError(f"invalid model: its packed files cannot be read ({type(exc).__name__}: "
                             f"{str(exc)[:80]})") from None


def _metadata_flatbuffer(info: ModelInfo, float_input: bool, uint8_input: bool) -> bytes:
    image = md.TensorMetadataT()
    image.name = INPUT_NAME
    image.description = "RGB image" + (f", (pixel - {_fmt(info.mean)}) / {_fmt(info.std)}" if float_input else "")
    image.content = md.ContentT()
    image.content.contentPropertiesType = md.ContentProperties.ImageProperties
    image.content.contentProperties = md.ImagePropertiesT()
    image.content.contentProperties.colorSpace = md.ColorSpaceType.RGB
    image.stats = md.StatsT()
    if float_input:  # the clients need it to turn pixels into a float32 input
        normalization = md.ProcessUnitT()
        normalization.optionsType = md.ProcessUnitOptions.NormalizationOptions
        normalization.options = md.NormalizationOptionsT()
        normalization.options.mean, normalization.options.std = list(info.mean), list(info.std)
        image.processUnits = [normalization]
        image.stats.min = [(0.0 - m) / s for m, s in zip(info.mean, info.std)]
        image.stats.max = [(255.0 - m) / s for m, s in zip(info.mean, info.std)]
    elif uint8_input:
        image.stats.min, image.stats.max = [0.0], [255.0]

    scores = md.TensorMetadataT()
    scores.name = OUTPUT_NAME
    scores.description = "Probability of each class"
    scores.content = md.ContentT()
    scores.content.contentPropertiesType = md.ContentProperties.FeatureProperties
    scores.content.contentProperties = md.FeaturePropertiesT()
    scores.stats = md.StatsT()
    if info.labels is not None:
        labels = md.AssociatedFileT()
        labels.name, labels.description = LABELS_FILE, "Class names, one per line, in output order"
        labels.type = md.AssociatedFileType.TENSOR_AXIS_LABELS
        scores.associatedFiles = [labels]

    subgraph = md.SubGraphMetadataT()
    subgraph.inputTensorMetadata, subgraph.outputTensorMetadata = [image], [scores]
    metadata = md.ModelMetadataT()
    metadata.name, metadata.version, metadata.description = info.name, info.version, info.description
    metadata.author = info.author
    metadata.subgraphMetadata = [subgraph]
    metadata.minParserVersion = MIN_PARSER_VERSION
    builder = flatbuffers_lib.Builder(0)
    builder.Finish(metadata.Pack(builder), METADATA_IDENTIFIER)
    return bytes(builder.Output())


def _signature(schema, input_index: int, output_index: int):
    def tensor_map(name: str, index: int):
        m = schema.TensorMapT()
        m.name, m.tensorIndex = name, index
        return m

    signature = schema.SignatureDefT()
    signature.signatureKey, signature.subgraphIndex = SIGNATURE_KEY, 0
    signature.inputs, signature.outputs = [tensor_map(INPUT_NAME, input_index)], [tensor_map(OUTPUT_NAME,
                                                                                             output_index)]
    return signature


def _remove_metadata(model) -> None:
    """Drop ``TFLITE_METADATA`` entries and, when nothing else refers to them, their buffers."""
    names = (METADATA_NAME, METADATA_NAME.encode())
    ours = {int(m.buffer) for m in model.metadata or [] if m.name in names}
    model.metadata = [m for m in model.metadata or [] if m.name not in names]
    if not ours:
        return
    others = {int(t.buffer) for g in model.subgraphs for t in g.tensors}
    others.update(int(m.buffer) for m in model.metadata)
    others.update(int(b) for b in (model.metadataBuffer if model.metadataBuffer is not None else []))
    for index in sorted(ours - others - {0}, reverse=True):
        del model.buffers[index]
        for g in model.subgraphs:
            for t in g.tensors:
                t.buffer -= int(t.buffer) > index
        for m in model.metadata:
            m.buffer -= int(m.buffer) > index
        if model.metadataBuffer is not None:
            model.metadataBuffer = [int(b) - (int(b) > index) for b in model.metadataBuffer]


def _fmt(values: tuple[float, ...]) -> str:
    return ", ".join(f"{v:g}" for v in values) if len(values) > 1 else f"{values[0]:g}"

"""The TFLite flatbuffer schema and its object API, from LiteRT.

Why not TensorFlow's copy: reading and rewriting a .tflite (inspection, the
graph rewrites, splicing, calibration) needs only these generated Python
classes, and importing them from ``tensorflow.lite`` imports all of
TensorFlow (about 2.7 s of CPU). LiteRT (a dependency) ships the same schema,
newer (the schema only ever gains fields), so ``convert X.tflite --int8``
runs without TensorFlow's Python package loaded, and nothing in
``pipeline.tflite`` imports it (``tests/test_architecture.py``). Objects of
this schema do not mix with those of TensorFlow's copy.
"""

from __future__ import annotations

import functools
import struct

from pipeline.core.errors import ModelLoadError


def tools():
    """(flatbuffer_utils, schema_py_generated)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils, schema


def schema():
    return tools()[1]


# What the generated readers raise on a flatbuffer whose offsets, indices or strings are wrong.
MALFORMED = (IndexError, KeyError, struct.error, ValueError, TypeError, AttributeError, UnicodeDecodeError,
             OverflowError, RecursionError, MemoryError)


def read(model_bytes: bytes):
    """The model as mutable objects; ``ModelLoadError`` when the flatbuffer cannot be read (an index past a
    list, an offset past the end: the object API reads everything, the interpreter only what it runs)."""
    try:
        return tools()[0].read_model_from_bytearray(bytearray(model_bytes))
    except MALFORMED as exc:
        raise ModelLoadError(f"invalid model: its flatbuffer cannot be read ({type(exc).__name__}: "
                             f"{str(exc)[:100]})") from None


def write(model) -> bytes:
    return bytes(tools()[0].convert_object_to_bytearray(model))


@functools.cache
def op_names() -> dict[int, str]:
    """Builtin operator code -> name (``CONV_2D``); read-only, shared."""
    return {v: k for k, v in vars(schema().BuiltinOperator).items() if not k.startswith("_")}


@functools.cache
def type_names() -> dict[int, str]:
    """Tensor type code -> name (``INT8``); read-only, shared."""
    return {v: k for k, v in vars(schema().TensorType).items() if not k.startswith("_")}


def builtin_code(code) -> int:
    """An OperatorCode's builtin operator, from the object or the reader API.

    The schema keeps the old int8 field ``deprecated_builtin_code`` beside the
    int32 ``builtin_code``; writers fill one or both, so the operator is the
    larger of the two (codes above 127 exist only in the new field).
    """
    if hasattr(code, "builtinCode"):
        return max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
    return max(int(code.BuiltinCode()), int(code.DeprecatedBuiltinCode()))


def ints(values) -> list[int]:
    """An index vector of the object API (a numpy array, a list, or None for an absent field) as ints."""
    return [int(v) for v in values] if values is not None else []


def text(value) -> str:
    """A name of the object API (bytes, str, or None) as str."""
    return value.decode() if isinstance(value, bytes) else str(value or "")


def op_name(model, op) -> str:
    """The builtin name (``CONV_2D``) of an operator of ``model`` (object API); ``?`` for custom ops."""
    return op_names().get(builtin_code(model.operatorCodes[op.opcodeIndex]), "?")

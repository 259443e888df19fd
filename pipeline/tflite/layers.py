"""Which Keras layer a .tflite tensor belongs to, read from the names the converter gives tensors.

The converter names a fused op's output after every layer folded into it
(``xception_1/block7_sepconv2_bn_1/batchnorm/add_1;...``); per-layer error,
float fallback and splicing all need the layer back from that name, and
making chosen tensors graph outputs so that they can be read after invoke.
"""

from __future__ import annotations

import re

import numpy as np

from pipeline.tflite import flatbuffers

_COMPUTE_HINTS = ("convolution", "separable_conv2d", "depthwise", "MatMul", "Conv2D", "BiasAdd")
_SCOPE_SUFFIX = re.compile(r"_\d+$")


def layer_names(tensor_name: str) -> list[str]:
    """Keras layer names inside a (possibly fused, ``;``-joined) tensor name.

    Keras 3 suffixes scopes with ``_1`` inside a traced function (``xception_1/block7_add_1/Add``);
    the suffix is removed only when the model scope has it too, so a layer really named ``conv_2`` survives.
    """
    names: list[str] = []
    for part in tensor_name.split(";"):
        segments = part.split("/")
        if len(segments) < 2:
            continue
        layer = segments[1]
        if _SCOPE_SUFFIX.search(segments[0]):
            layer = _SCOPE_SUFFIX.sub("", layer)
        if layer not in names:
            names.append(layer)
    return names


def primary_layer(tensor_name: str, names: list[str]) -> str:
    """The layer that computes a fused tensor: its conv/matmul part, else the first layer named."""
    for part in tensor_name.split(";"):
        if any(h in part for h in _COMPUTE_HINTS):
            found = layer_names(part)
            if found:
                return found[0]
    return names[0] if names else tensor_name



def expose_tensors(model_bytes: bytes, indices) -> bytes:
    """A copy of the model in which the given tensors are also graph outputs (so they survive planning)."""
    model = flatbuffers.read(model_bytes)
    graph = model.subgraphs[0]
    keep = list(dict.fromkeys([int(o) for o in graph.outputs] + [int(i) for i in indices]))
    graph.outputs = np.asarray(keep, dtype=np.int32)
    return flatbuffers.write(model)

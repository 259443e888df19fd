"""LiteRT's private per-node view is read only behind its version pin; the flatbuffer's own ops are the fallback,
and the fallback gives the same ops, in the same order, on the same tensors."""

from __future__ import annotations

import pytest

from pipeline.tflite import rewrites, runtime
from pipeline.tflite.runtime import delegated_nodes, flatbuffer_ops, graph_ops, node_view_supported, open_interpreter


@pytest.fixture(scope="module")
def float_bytes(tiny_keras_path, tmp_path_factory) -> bytes:
    from pipeline.conversion.export import ConvertSettings, export_tflite

    out = tmp_path_factory.mktemp("runtime") / "tiny_float.tflite"
    return export_tflite(tiny_keras_path, ConvertSettings("float"), out=out).path.read_bytes()


def _without_delegates(nodes: list[dict]) -> list[dict]:
    return [n for n in nodes if n["op_name"] != "DELEGATE"]


def test_the_pinned_view_is_read_on_this_litert(float_bytes):
    interpreter = open_interpreter(float_bytes)
    assert node_view_supported(interpreter) == (True, "ok"), "re-check pipeline/tflite/runtime.py for this LiteRT"
    nodes, why = delegated_nodes(interpreter)
    assert why == "ok" and nodes is not None and any(n["op_name"] == "DELEGATE" for n in nodes)  # XNNPACK took part


@pytest.mark.parametrize("preserve_all_tensors", [True, False], ids=["no-delegate", "xnnpack"])
def test_fallback_ops_equal_the_interpreters_nodes(float_bytes, preserve_all_tensors):
    interpreter = open_interpreter(float_bytes, preserve_all_tensors=preserve_all_tensors)
    pinned = graph_ops(interpreter, float_bytes)
    fallback = flatbuffer_ops(float_bytes)
    assert len(fallback) > 10 and _without_delegates(pinned) == fallback
    assert (pinned == fallback) is preserve_all_tensors  # a delegate only adds its own DELEGATE nodes


def test_another_litert_gets_the_fallback(float_bytes, monkeypatch):
    monkeypatch.setattr(runtime, "SUPPORTED_LITERT", ("0.0.",))
    monkeypatch.setattr(rewrites, "_REPORTS", {})  # the report is memoised by content
    interpreter = open_interpreter(float_bytes)
    ok, why = node_view_supported(interpreter)
    assert not ok and "pinned to ai-edge-litert 0.0.x" in why
    assert graph_ops(interpreter, float_bytes) == flatbuffer_ops(float_bytes)
    assert delegated_nodes(interpreter) == (None, why)
    assert rewrites.xnnpack_report(float_bytes) == {"partitions": None, "outside": [], "unknown": why}


def test_an_interpreter_without_the_private_view_gets_the_fallback(float_bytes):
    class Stock:  # what an interpreter would look like once LiteRT drops the name
        pass

    assert node_view_supported(Stock()) == (False, "ai_edge_litert Interpreter._get_ops_details is gone")
    assert graph_ops(Stock(), float_bytes) == flatbuffer_ops(float_bytes)

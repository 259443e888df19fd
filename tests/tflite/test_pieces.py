"""Running an int8 model piecewise gives the tensors a whole run gives, bit for bit, each op run once."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.tflite.pieces import PiecewiseRun, stacked_sum
from pipeline.tflite.runtime import open_interpreter
from pipeline.tflite.weighted_layers import Constants, levels, unshared, weighted_layers
from tests.tflite.test_int8_methods import _values


@pytest.fixture(scope="module")
def int8_model(trained_tflite, calibration):
    quant = trained_tflite["int8"].read_bytes()
    floating = trained_tflite["float"].read_bytes()
    inputs = [calibration.with_convention("pixels").inputs(i) for i in range(6)]
    layers = [layer for layer in weighted_layers(quant, floating) if layer.quant_bias is not None]
    return unshared(quant, [layer.quant_bias for layer in layers]), layers, inputs


def test_pieces_give_the_whole_runs_values_running_each_op_once(int8_model):
    quant, layers, inputs = int8_model
    groups = levels(quant, layers)
    assert len(groups) >= 2
    run = PiecewiseRun(quant, inputs)
    whole = _values(quant, [layer.quant_input for layer in layers] + [layers[-1].quant_output], inputs)
    found = {}
    for group in groups:
        found |= run.values([layer.quant_input for layer in group])
    # compared after every piece ran: a later piece never writes over a value returned earlier
    for layer in layers:
        assert all(np.array_equal(a[0], b) for a, b in zip(found[layer.quant_input], whole[layer.quant_input]))
    last = run.values([layers[-1].quant_output])[layers[-1].quant_output]
    assert all(np.array_equal(a[0], b) for a, b in zip(last, whole[layers[-1].quant_output]))
    assert run.ops_run == len(run.done) and run.pieces == len(groups) + 1


def test_the_workers_sums_are_the_whole_runs_sums(int8_model):
    """The sums the workers add up as they run equal the sums of the values a whole run gives: integers, so
    exactly; the first group's input (the graph's) is summed from the stored values."""
    quant, layers, inputs = int8_model
    groups = levels(quant, layers)
    whole = _values(quant, [layer.quant_input for layer in layers], inputs)
    with PiecewiseRun(quant, inputs) as run:
        for group in groups:
            found = run.sums([layer.quant_input for layer in group])
            for layer in group:
                expected = np.sum([v.astype(np.int64) for v in whole[layer.quant_input]], axis=0)
                assert np.array_equal(found[layer.quant_input].reshape(expected.shape), expected)


def test_a_constant_patched_before_its_op_runs_is_seen_downstream(int8_model):
    quant, layers, inputs = int8_model
    first, last = layers[0], layers[-1]
    patched = Constants(quant)
    bias = patched.view(first.quant_bias)
    bias[...] = bias + 1000  # far enough to move the final outputs
    run = PiecewiseRun(quant, inputs)
    run.values([first.quant_input])
    run.patch(first.quant_bias, bias)
    found = run.values([last.quant_output])[last.quant_output]
    expected = _values(patched.bytes(), [last.quant_output], inputs)[last.quant_output]
    original = _values(quant, [last.quant_output], inputs)[last.quant_output]
    assert all(np.array_equal(a[0], b) for a, b in zip(found, expected))
    assert not all(np.array_equal(a, b) for a, b in zip(expected, original))


def test_one_op_cut_out_computes_what_it_computes_inside_the_model(int8_model):
    """A per-op profile times each op as a model of its own: fed the whole run's values of its inputs, it gives
    the whole run's values of its outputs, bit for bit."""
    quant, layers, inputs = int8_model
    run = PiecewiseRun(quant, [])
    graph = run.graph
    checked = set()
    for index, op in enumerate(graph.operators):
        name = run.op_name(index)
        if name in checked:
            continue
        checked.add(name)
        feeds = [int(t) for t in op.inputs if t >= 0 and not run.constant(int(t))]
        out = int(op.outputs[0])
        whole = _values(quant, feeds + [out], inputs[:2])
        interpreter = open_interpreter(run.one_op(index))
        for i in range(2):
            for detail, t in zip(interpreter.get_input_details(), feeds):
                interpreter.set_tensor(detail["index"], whole[t][i][None].astype(detail["dtype"]))
            interpreter.invoke()
            got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]
            assert np.array_equal(got, whole[out][i]), name
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD"} <= checked
    run.close()


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from([np.int8, np.uint8, np.int16]), rows=st.integers(1, 700),
       extreme=st.sampled_from(["min", "max", "random"]), seed=st.integers(0, 2**16))
def test_stacked_sum_is_exact_past_the_narrow_accumulators_room(dtype, rows, extreme, seed):
    """Up to 700 rows of the extreme value: past the 255 int8 (128 uint8) rows an int16 accumulator holds, so
    an unflushed partial sum would overflow."""
    values = np.iinfo(dtype)
    if extreme == "random":
        block = np.random.default_rng(seed).integers(values.min, values.max, (rows, 3, 5), endpoint=True).astype(dtype)
    else:
        block = np.full((rows, 3, 5), values.min if extreme == "min" else values.max, dtype)
    found = stacked_sum(block)
    assert found.dtype == np.int64
    assert np.array_equal(found, block.astype(np.int64).sum(axis=0))

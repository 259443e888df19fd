"""The builder is the paper's Xception: layer for layer Keras's, with stable names."""

import re

import pytest

from pipeline.model.xception import MIN_INPUT_SIZE, XceptionConfig, build_xception, scaled_channels

NAME = re.compile(r"^(image|avg_pool|predictions|block\d+_(conv\d|conv\d_bn|conv\d_act|sepconv\d|sepconv\d_bn|"
                  r"sepconv\d_act|residual_conv|residual_bn|pool|add))$")


def _signature(layer):
    return type(layer).__name__, tuple(layer.output.shape), layer.count_params()


def test_default_matches_keras_applications_layer_for_layer():
    import keras

    ours = build_xception()
    theirs = keras.applications.Xception(weights=None)
    assert ours.count_params() == theirs.count_params() == 22_910_480
    assert len(ours.layers) == len(theirs.layers) == 134
    mismatches = [(a.name, b.name) for a, b in zip(ours.layers, theirs.layers) if _signature(a) != _signature(b)]
    assert mismatches == []
    # Weights move across by position, which is what --weights relies on.
    assert [w.shape for w in ours.get_weights()] == [w.shape for w in theirs.get_weights()]


def test_every_layer_is_named_by_block_and_role_and_stable():
    a = build_xception(71, 10, 0.25, 2)
    b = build_xception(71, 10, 0.25, 2)
    names = [layer.name for layer in a.layers]
    assert names == [layer.name for layer in b.layers]
    assert len(set(names)) == len(names)
    assert [n for n in names if not NAME.match(n)] == []
    assert "block4_residual_conv" in names and "block7_add" in names and "block8_sepconv2_act" in names


def test_paper_structure():
    import keras

    m = build_xception(71, 10, 0.5, 3)
    seps = [layer for layer in m.layers if isinstance(layer, keras.layers.SeparableConv2D)]
    # No nonlinearity between depthwise and pointwise, no bias (BatchNorm follows).
    assert all(s.activation.__name__ == "linear" and not s.use_bias for s in seps)
    # entry 2+2+2, middle 3 per block, exit 2+2
    assert len(seps) == 6 + 3 * 3 + 4
    adds = [layer for layer in m.layers if isinstance(layer, keras.layers.Add)]
    assert len(adds) == 3 + 3 + 1
    assert m.get_layer("block7_sepconv3").filters == scaled_channels(728, 0.5)
    assert m.output.shape[-1] == 10
    assert m.get_layer("predictions").activation.__name__ == "softmax"


@pytest.mark.parametrize("width", [0.1, 0.25, 0.5, 0.75, 1.3])
def test_width_scales_channels_to_multiples_of_8(width):
    for channels in (32, 64, 128, 256, 728, 1024, 1536, 2048):
        value = scaled_channels(channels, width)
        assert value % 8 == 0 and value >= 8
        assert abs(value - channels * width) <= max(8, 0.1 * channels * width)


def test_smallest_input_and_bad_configs():
    m = build_xception(MIN_INPUT_SIZE, 3, 0.25, 0)
    assert m.input.shape[1:] == (71, 71, 3)
    for bad in (dict(input_size=64), dict(classes=1), dict(width=0), dict(middle_blocks=-1)):
        with pytest.raises(ValueError):
            XceptionConfig(**bad)

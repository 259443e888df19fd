"""One preprocessing definition: Keras-exact scaling, every image mode, the aspect policy."""

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.core.preprocessing import (ImageError, PreprocessSpec, decode_rgb, dequantize, load_rgb, preprocess_file,
                                    preprocess_pixels, quantize, resize_rgb, scale)


def _encode(im, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_scaling_is_bit_exact_with_keras_xception_preprocess_input():
    import keras

    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 71, 71, 3), dtype=np.uint8)
    ours = scale(pixels)
    theirs = keras.applications.xception.preprocess_input(pixels.astype(np.float32).copy())
    assert ours.dtype == np.float32
    assert np.array_equal(ours, np.asarray(theirs))
    assert ours.min() >= -1.0 and ours.max() <= 1.0


def test_file_path_equals_keras_path_on_same_pixels(tmp_path):
    import keras

    rgb = np.random.default_rng(1).integers(0, 256, size=(71, 71, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    ours = preprocess_file(tmp_path / "x.png", PreprocessSpec(71))
    theirs = keras.applications.xception.preprocess_input(rgb.astype(np.float32))
    assert np.array_equal(ours, theirs)


def test_center_crop_keeps_aspect():
    rgb = np.zeros((50, 100, 3), np.uint8)
    rgb[:, :25] = (255, 0, 0)
    rgb[:, 75:] = (255, 0, 0)
    rgb[:, 25:75] = (0, 0, 255)
    out = resize_rgb(rgb, 20)
    assert out.shape == (20, 20, 3)
    assert (out[..., 2] > 200).all() and (out[..., 0] < 30).all()  # the red sides were cropped, not squeezed in


def test_modes_become_rgb_without_clamping():
    # 16-bit grayscale: 65535 -> 255, 32896 -> 128; a plain convert("L") would clamp everything to 255.
    sixteen = Image.fromarray(np.array([[0, 32896], [65535, 1000]], dtype=np.uint16))
    out = decode_rgb(_encode(sixteen, "PNG"))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 128 and out[1, 0, 0] == 255 and out[1, 1, 0] == 4

    gray = decode_rgb(_encode(Image.new("L", (4, 4), 77), "PNG"))
    assert (gray == 77).all()

    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent -> white background
    assert (decode_rgb(_encode(rgba, "PNG")) == 255).all()
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert abs(int(decode_rgb(_encode(half, "PNG"))[0, 0, 0]) - 127) <= 1

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([200, 0, 0] + [0, 0, 0] * 255)
    palette.info["transparency"] = 0
    assert (decode_rgb(_encode(palette, "PNG", transparency=0)) == 255).all()

    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_rgb(_encode(cmyk, "JPEG", quality=100))
    assert out[0, 0, 0] > 200 and out[0, 0, 1] < 60 and out[0, 0, 2] < 60

    la = Image.new("LA", (3, 3), (0, 255))
    assert (decode_rgb(_encode(la, "PNG")) == 0).all()
    bw = Image.new("1", (3, 3), 1)
    assert (decode_rgb(_encode(bw, "PNG")) == 255).all()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "WEBP", "TIFF"])
def test_common_formats_decode(fmt):
    rgb = np.full((16, 24, 3), (30, 120, 220), np.uint8)
    out = decode_rgb(_encode(Image.fromarray(rgb), fmt, **({"quality": 100} if fmt in ("JPEG", "WEBP") else {})))
    assert out.shape == (16, 24, 3)
    assert np.abs(out.astype(int) - rgb).max() <= 6


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = decode_rgb(data)
    assert out[0, 0, 0] > 200 and out[0, 0, 1] < 50


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=100)
    out = load_rgb(tmp_path / "r.jpg")
    assert out.shape == (40, 20, 3)  # portrait after orientation
    assert out[2, 10, 0] > 200  # red on top after a clockwise turn


def test_bad_bytes_raise_image_error(tmp_path):
    for name, data, reason in [("empty.png", b"", "empty"), ("text.jpg", b"hello, not an image", "not a recognised"),
                               ("trunc.png", _encode(Image.new("RGB", (64, 64), 5), "PNG")[:60], "corrupt")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError, match=reason):
            load_rgb(tmp_path / name)


def test_decompression_bomb_rejected_before_decoding():
    # A 30000x30000 PNG is small on disk; it must be refused from its header alone.
    from PIL import PngImagePlugin  # noqa: F401

    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    assert len(data) < 200
    with pytest.raises(ImageError, match="too large"):
        decode_rgb(data)


def test_spec_fingerprint_is_stable_and_sensitive():
    assert PreprocessSpec(71).fingerprint == PreprocessSpec(71).fingerprint
    assert PreprocessSpec(71).fingerprint != PreprocessSpec(299).fingerprint
    assert PreprocessSpec(299).describe()["fingerprint"] == PreprocessSpec(299).fingerprint
    with pytest.raises(ValueError):
        PreprocessSpec(71, aspect="stretch")


def test_quantize_round_trip_int8():
    x = np.linspace(-1, 1, 255, dtype=np.float32)
    q = quantize(x, np.int8, 2 / 255, -1)
    assert q.dtype == np.int8 and q.min() == -128 and q.max() == 126  # 1.0 / float32(2/255) is just under 127.5
    assert np.abs(dequantize(q, 2 / 255, -1) - x).max() <= 1 / 255 + 1e-6


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 60), w=st.integers(1, 60), size=st.integers(8, 40), seed=st.integers(0, 2**16))
def test_any_pixels_give_model_range(h, w, size, seed):
    rgb = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    out = preprocess_pixels(rgb, PreprocessSpec(size))
    assert out.shape == (size, size, 3) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= -1.0 and out.max() <= 1.0

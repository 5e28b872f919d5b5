"""gem_backend.labelstudio.brush against the Label Studio SDK's brush RLE code (the reference)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from label_studio_sdk.converter import brush as sdk

from gem_backend.labelstudio.brush import _decode_words, mask2rle, rle2mask


def _check_mask(mask: np.ndarray, sdk_decode: bool = True) -> list[int]:
    """mask2rle == SDK byte for byte; rle2mask inverts it and agrees with the SDK decoder."""
    ours = mask2rle(mask)
    ref = sdk.mask2rle(mask)
    assert len(ours) == len(ref)
    if ours != ref:
        first = next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
        pytest.fail(f"byte {first} differs: ours {ours[first]} sdk {ref[first]}")
    assert type(ours[0]) is int and type(ours[-1]) is int

    h, w = mask.shape
    back = rle2mask(ours, h, w)
    assert back.shape == (h, w) and back.dtype == np.uint8 and back.flags.c_contiguous
    np.testing.assert_array_equal(back, mask)
    if sdk_decode:
        np.testing.assert_array_equal(back, sdk.decode_rle(ref).reshape(h, w, 4)[:, :, 3])
    return ours


def _binary(a) -> np.ndarray:
    return (np.asarray(a) != 0).astype(np.uint8) * 255


def _row(*runs: tuple[int, int]) -> np.ndarray:
    """A 1-row mask from (value, pixel count) runs."""
    return np.concatenate([np.full(n, v, np.uint8) for v, n in runs])[None, :]


def _blobs(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    yy, xx = np.ogrid[:h, :w]
    mask = np.zeros((h, w), bool)
    for _ in range(n):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        ry, rx = rng.integers(2, max(3, h // 4)), rng.integers(2, max(3, w // 4))
        mask ^= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    return _binary(mask)


_RNG = np.random.default_rng(20240611)

# Run lengths are in pixels; the stream has 4 words per pixel, so 2 px = 8 words
# (last 3-bit count), 3-4 px = 12-16 words (4-bit), 5-64 px (8-bit), 65+ px (16-bit),
# 16384 px = 65536 words (largest single record), 16385+ px (split records).
FIXED = {
    "1x1 zero": np.zeros((1, 1), np.uint8),
    "1x1 full": np.full((1, 1), 255, np.uint8),
    "2x2 one pixel": _binary([[0, 1], [0, 0]]),
    "empty 480x640": np.zeros((480, 640), np.uint8),
    "full 480x640": np.full((480, 640), 255, np.uint8),
    "pixel top-left": _binary(np.pad([[1]], ((0, 99), (0, 99)))),
    "pixel bottom-right": _binary(np.pad([[1]], ((99, 0), (99, 0)))),
    "pixel middle": _binary(np.pad([[1]], ((50, 49), (37, 62)))),
    "1xN noise": _binary(_RNG.random((1, 999)) < 0.5),
    "Nx1 noise": _binary(_RNG.random((999, 1)) < 0.5),
    "1xN full": np.full((1, 37), 255, np.uint8),
    "7x13 noise": _binary(_RNG.random((7, 13)) < 0.5),
    "13x7 noise": _binary(_RNG.random((13, 7)) < 0.3),
    "horizontal line": _binary(np.pad(np.ones((1, 300)), ((100, 99), (0, 0)))),
    "vertical line": _binary(np.pad(np.ones((200, 1)), ((0, 0), (150, 149)))),
    "diagonal": _binary(np.eye(257)),
    "1px frame": _binary(np.pad(np.zeros((61, 89)), 1, constant_values=1)),
    "checkerboard": _binary(np.indices((64, 65)).sum(0) % 2),
    "class boundaries": _row(
        *[(255 * (i % 2), n) for i, n in enumerate([1, 2, 3, 4, 5, 16, 17, 64, 65, 66, 200, 2])]
    ),
    "run of 65536 words": _row((0, 16384), (255, 3)),
    "run of 65540 words": _row((255, 16385), (0, 1)),
    "runs of 131072 and 131076 words": _row((0, 32768), (255, 32769)),
    "runs far over 65536 words": _row((255, 5), (0, 100_000), (255, 70_001), (0, 4)),
    "raw values 0..255": np.arange(256, dtype=np.uint8).reshape(16, 16),
    "raw values runs": np.repeat(np.array([[0, 1, 128, 254, 255, 7]], np.uint8), 30, axis=1),
    "sparse noise": _binary(_RNG.random((300, 400)) < 0.01),
    "half noise": _binary(_RNG.random((200, 300)) < 0.5),
    "dense noise": _binary(_RNG.random((300, 400)) < 0.99),
}


@pytest.mark.parametrize("name", list(FIXED))
def test_fixed_masks_match_sdk(name):
    _check_mask(FIXED[name])


def test_blob_mask_1000x1000():
    mask = _blobs(np.random.default_rng(7), 1000, 1000, 25)
    assert 0.05 < (mask > 0).mean() < 0.95  # not trivially empty or full
    rle = _check_mask(mask)
    json.dumps(rle)  # goes into a Label Studio result as is


def test_non_contiguous_and_int_masks():
    base = _blobs(np.random.default_rng(3), 120, 90, 6)
    for view in (base.T, base[::2, 1::3], np.asfortranarray(base)):
        assert mask2rle(view) == sdk.mask2rle(view) == mask2rle(np.ascontiguousarray(view))
    as_int = base.astype(int)
    assert as_int.dtype == np.dtype(int)
    assert mask2rle(as_int) == sdk.mask2rle(as_int) == mask2rle(base)


def test_padding_rule():
    # 53 header bits + 15 + 14 + 14 record bits = 96: byte aligned, yet the SDK
    # still appends a whole zero byte.
    aligned = _row((0, 3), (255, 1), (0, 1))
    assert len(_check_mask(aligned)) == 96 // 8 + 1
    assert mask2rle(aligned)[-1] == 0
    # 53 + 14 + 14 = 81 bits: 7 padding bits.
    assert len(_check_mask(_row((0, 1), (255, 1)))) == 88 // 8


def test_random_masks_fixed_seed():
    rng = np.random.default_rng(1234)
    kinds = ["speckle", "blobs", "multi-value", "runs"]
    for i in range(80):
        kind = kinds[i % len(kinds)]
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        if kind == "speckle":
            mask = _binary(rng.random((h, w)) < rng.random())
        elif kind == "blobs":
            mask = _blobs(rng, h, w, int(rng.integers(1, 6)))
        elif kind == "multi-value":
            mask = rng.choice(np.array([0, 3, 128, 255], np.uint8), size=(h, w))
        else:
            # Run lengths spread over every count-field class and over the 65536 cut.
            lengths = np.exp(rng.uniform(0, np.log(40_000), int(rng.integers(1, 12)))).astype(int) + 1
            mask = _row(*[(255 * (j % 2), int(n)) for j, n in enumerate(lengths)])
        _check_mask(mask, sdk_decode=h * w < 5000)


def test_rejects_what_the_sdk_rejects():
    good = np.zeros((4, 5), np.uint8)
    for dtype in (bool, np.int8, np.int16, np.int32, np.uint16, np.float32, np.float64):
        with pytest.raises(AssertionError):
            sdk.mask2rle(good.astype(dtype))
        with pytest.raises(TypeError):
            mask2rle(good.astype(dtype))
    for shape in ((20,), (4, 5, 1)):
        with pytest.raises(AssertionError):
            sdk.mask2rle(good.reshape(shape))
        with pytest.raises(TypeError):
            mask2rle(good.reshape(shape))
    with pytest.raises(TypeError):  # the SDK fails on empty masks too, just less clearly
        sdk.mask2rle(np.zeros((0, 5), np.uint8))
    with pytest.raises(ValueError):
        mask2rle(np.zeros((0, 5), np.uint8))
    for bad in (-1, 256):
        with pytest.raises(ValueError):
            mask2rle(np.array([[0, bad]], dtype=int))


# ---------------------------------------------------------------------------
# Decoding streams mask2rle never writes: literal records, other word sizes
# and count widths, as the Label Studio frontend (rle-pack) may.


def _stream(records, word_size: int, rle_sizes, num: int | None = None) -> list[int]:
    """Spell out a stream: records are ("rep", code, count, value) or ("lit", code, values)."""
    bits = [format(num if num is not None else _n_words(records), "032b"), format(word_size - 1, "05b")]
    bits += [format(n - 1, "04b") for n in rle_sizes]
    for rec in records:
        n = rle_sizes[rec[1]]
        assert 1 <= _n_words([rec]) <= 1 << n
        if rec[0] == "rep":
            _, code, count, value = rec
            bits += ["1", format(code, "02b"), format(count - 1, f"0{n}b"), format(value, f"0{word_size}b")]
        else:
            _, code, values = rec
            bits += ["0", format(code, "02b"), format(len(values) - 1, f"0{n}b")]
            bits += [format(v, f"0{word_size}b") for v in values]
    text = "".join(bits)
    text += "0" * (8 - len(text) % 8)
    return [int(text[i : i + 8], 2) for i in range(0, len(text), 8)]


def _n_words(records) -> int:
    return sum(r[2] if r[0] == "rep" else len(r[2]) for r in records)


def _random_records(rng, n_records: int, word_size: int, rle_sizes, max_count: int = 300):
    top = min(1 << word_size, 256)  # the SDK decodes into uint8
    records, words = [], []
    for _ in range(n_records):
        code = int(rng.integers(4))
        cap = min(1 << rle_sizes[code], max_count)
        count = int(rng.integers(1, cap + 1)) if rng.random() < 0.5 else int(rng.integers(1, min(cap, 8) + 1))
        if rng.random() < 0.5:
            values = rng.integers(0, top, count).tolist()
            records.append(("lit", code, values))
            words += values
        else:
            value = int(rng.integers(0, top))
            records.append(("rep", code, count, value))
            words += [value] * count
    return records, np.array(words, np.uint8)


def test_decoder_matches_sdk_on_random_streams():
    rng = np.random.default_rng(99)
    for i in range(60):
        word_size = int(rng.integers(1, 13))
        # Count widths up to 16 bits: literal records with > 8-bit counts take
        # the decoder's slow path, the rest its regex path.
        rle_sizes = [int(v) for v in rng.integers(1, 17, 4)]
        records, words = _random_records(rng, int(rng.integers(1, 40)), word_size, rle_sizes)
        rle = _stream(records, word_size, rle_sizes)
        ours = _decode_words(rle)
        np.testing.assert_array_equal(ours, words)
        np.testing.assert_array_equal(ours, sdk.decode_rle(rle))


def test_decoder_long_streams():
    # Speckle: > 2**21 bits of repeat records, so the regex path runs through
    # chunks growing to their maximum size.
    rng = np.random.default_rng(5)
    speckle = _binary(rng.random((600, 700)) < 0.5)
    rle = mask2rle(speckle)
    assert len(rle) * 8 > 1 << 21
    np.testing.assert_array_equal(rle2mask(rle, 600, 700), speckle)
    # Literal records the regex cannot take (16-bit counts) among the rest:
    # frequent fallbacks, and chunks cut short around them.
    rle_sizes = (3, 4, 8, 16)
    records, words = _random_records(rng, 5_000, 8, rle_sizes, max_count=40)
    assert sum(r[0] == "lit" and r[1] == 3 for r in records) > 500
    np.testing.assert_array_equal(_decode_words(_stream(records, 8, rle_sizes)), words)


def test_rle2mask_frontend_style_rgba():
    # Literal-heavy stream: colour in R, G, B and a separate alpha, like a canvas dump.
    rng = np.random.default_rng(11)
    h, w = 23, 31
    alpha = _blobs(rng, h, w, 3)
    rgba = np.stack([np.full((h, w), 200), np.full((h, w), 17), alpha // 3, alpha], -1)
    rgba = rgba.astype(np.uint8).ravel()
    records, i = [], 0
    while i < rgba.size:
        count = int(min(rng.integers(1, 300), rgba.size - i))
        records.append(("lit", 2, rgba[i : i + count].tolist()))
        i += count
    rle = _stream(records, 8, (3, 4, 9, 16))
    ours = rle2mask(rle, h, w)
    np.testing.assert_array_equal(ours, alpha)
    np.testing.assert_array_equal(ours, sdk.decode_rle(rle).reshape(h, w, 4)[:, :, 3])


def test_last_repeat_is_clipped_like_the_sdk():
    records = [("rep", 1, 5, 9), ("lit", 0, [1, 2]), ("rep", 3, 100, 255)]
    rle = _stream(records, 8, (3, 4, 8, 16), num=4 * 3 * 3)  # declares 36 of 107 words
    np.testing.assert_array_equal(_decode_words(rle), sdk.decode_rle(rle))
    np.testing.assert_array_equal(rle2mask(rle, 3, 3), sdk.decode_rle(rle).reshape(3, 3, 4)[:, :, 3])


def test_decoder_input_types():
    mask = _blobs(np.random.default_rng(2), 40, 50, 4)
    rle = mask2rle(mask)
    forms = (rle, bytes(rle), np.array(rle, np.uint8), np.array(rle, np.int64), [np.uint8(b) for b in rle])
    for form in forms:
        np.testing.assert_array_equal(rle2mask(form, 40, 50), mask)


def test_decoder_rejects_malformed_streams():
    mask = _blobs(np.random.default_rng(4), 30, 30, 3)
    rle = mask2rle(mask)
    with pytest.raises(ValueError):
        rle2mask(rle, 30, 31)  # wrong size
    with pytest.raises(ValueError):
        rle2mask(rle[: len(rle) // 2], 30, 30)  # truncated
    with pytest.raises(ValueError):
        rle2mask(rle[:5], 30, 30)  # not even a header
    with pytest.raises(ValueError):
        rle2mask(rle[:-1] + [256], 30, 30)
    with pytest.raises(ValueError):
        rle2mask(np.array([rle], np.uint8), 30, 30)  # 2-D
    # A literal record past the declared word count: the SDK fails too.
    past = _stream([("lit", 0, [1, 2, 3, 4, 5])], 8, (3, 4, 8, 16), num=4)
    with pytest.raises(IndexError):
        sdk.decode_rle(past)
    with pytest.raises(ValueError):
        _decode_words(past)
    # A 9-bit word over 255 fits no uint8 mask: the SDK fails too.
    big = _stream([("rep", 0, 4, 300)], 9, (3, 4, 8, 16))
    with pytest.raises(OverflowError):
        sdk.decode_rle(big)
    with pytest.raises(ValueError):
        _decode_words(big)


# ---------------------------------------------------------------------------------- from the small map
def _nearest(n_in: int, n_out: int) -> np.ndarray:
    from gem_backend.algorithm.segmentation import nearest_indices

    return nearest_indices(n_in, n_out)


@pytest.mark.parametrize("small_shape,size", [
    ((7, 9), (21, 27)),          # integer factor 3
    ((7, 9), (23, 31)),          # non-integer factors, odd sizes
    ((448, 592), (3000, 4000)),  # the 12 MP request: 6.70 x 6.76
    ((13, 11), (13, 11)),        # no resize
    ((40, 30), (17, 23)),        # downsampling: some small rows/columns never show
    ((1, 5), (9, 1)),            # degenerate strips
])
def test_stretched_rle_is_the_sdk_rle_of_the_full_mask(small_shape, size):
    from gem_backend.algorithm.segmentation import resize_nearest
    from gem_backend.labelstudio.brush import stretched_mask2rle

    rng = np.random.default_rng(small_shape[0] * size[1])
    h, w = small_shape
    rows, cols = _nearest(h, size[0]), _nearest(w, size[1])
    masks = [_binary(rng.random(small_shape) < 0.5), _binary(_blobs(rng, h, w, 3)),
             np.zeros(small_shape, np.uint8), np.full(small_shape, 255, np.uint8)]
    for small in masks:
        full = resize_nearest(small, size)   # exactly what the label map upsampling does
        assert full.shape == size
        ours = stretched_mask2rle(small, rows, cols)
        if full.size <= 300_000:
            assert ours == list(sdk.mask2rle(np.ascontiguousarray(full)))
        else:  # the SDK takes seconds here; mask2rle is checked against it above
            assert ours == mask2rle(np.ascontiguousarray(full))
        np.testing.assert_array_equal(rle2mask(ours, *size), full)


def test_stretched_rle_random_index_maps_and_values():
    from gem_backend.labelstudio.brush import stretched_mask2rle

    rng = np.random.default_rng(7)
    for _ in range(200):
        h, w = rng.integers(1, 12, 2)
        small = rng.choice(np.array([0, 255, 17], np.uint8), size=(h, w))
        # any non-decreasing index maps (long runs over 65536 words included below)
        rows = np.sort(rng.integers(0, h, rng.integers(1, 40)))
        cols = np.sort(rng.integers(0, w, rng.integers(1, 40)))
        full = np.ascontiguousarray(small[rows][:, cols])
        assert stretched_mask2rle(small, rows, cols) == list(sdk.mask2rle(full))
    small = np.array([[0, 255], [255, 0]], np.uint8)
    rows, cols = np.repeat([0, 1], [300, 200]), np.repeat([0, 1], [700, 100])   # runs of 840000 words
    full = np.ascontiguousarray(small[rows][:, cols])
    assert stretched_mask2rle(small, rows, cols) == list(sdk.mask2rle(full))


def test_stretched_rle_rejects_bad_index_maps():
    from gem_backend.labelstudio.brush import stretched_mask2rle

    small = np.zeros((3, 4), np.uint8)
    for rows, cols in (([0, 2, 1], [0]), ([0, 3], [0]), ([0], [-1, 0]), ([], [0])):
        with pytest.raises(ValueError):
            stretched_mask2rle(small, np.array(rows, np.int64), np.array(cols, np.int64))
    with pytest.raises(TypeError):
        stretched_mask2rle(np.zeros((3, 4), np.float32), [0], [0])


def test_brush_region_from_the_small_mask_equals_the_full_mask_one():
    from gem_backend.algorithm.segmentation import resize_nearest
    from gem_backend.labelstudio.results import brush_region
    from gem_backend.labelstudio.spec import BrushTarget

    target = BrushTarget("tag", "image", "image", ("cat",), ("cat",))
    small = np.random.default_rng(3).random((37, 45)) < 0.3
    size = (301, 499)
    full = resize_nearest(small.astype(np.uint8), size).astype(bool)
    a = brush_region(full, "cat", target, 0.5, region_id="a")
    b = brush_region(small, "cat", target, 0.5, region_id="a", stretch=(_nearest(37, 301), _nearest(45, 499)))
    assert a == b and (b["original_width"], b["original_height"]) == (499, 301)


@pytest.mark.parametrize("small_shape,size", [((7, 9), (23, 31)), ((40, 30), (17, 23)), ((448, 592), (3000, 4000)),
                                              ((1, 6), (5, 13))])
def test_label_rles_of_a_label_map_equal_one_mask_at_a_time(small_shape, size):
    from gem_backend.labelstudio.brush import stretched_label_rles, stretched_mask2rle

    rng = np.random.default_rng(size[0])
    h, w = small_shape
    coarse = rng.integers(0, 6, (max(1, h // 5), max(1, w // 5)))
    label_map = np.kron(coarse, np.ones((5, 5), np.int64))[:h, :w].astype(np.uint16)
    label_map = np.pad(label_map, ((0, h - label_map.shape[0]), (0, w - label_map.shape[1])), mode="edge")
    label_map[rng.random(small_shape) < 0.02] = 3  # speckle too
    rows, cols = _nearest(h, size[0]), _nearest(w, size[1])
    values = [0, 1, 3, 5, 9]  # 9 is absent: an all-zero mask
    got = stretched_label_rles(label_map, values, rows, cols)
    for value, rle in zip(values, got):
        mask = np.where(label_map == value, 255, 0).astype(np.uint8)
        assert rle == stretched_mask2rle(mask, rows, cols)
    if h * w < 1000:
        full = label_map[rows][:, cols]
        assert got[2] == list(sdk.mask2rle(np.where(full == 3, 255, 0).astype(np.uint8)))

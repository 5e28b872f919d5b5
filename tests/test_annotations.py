"""Label Studio results -> masks and label maps (gem_backend.labelstudio.annotations)."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from gem_backend.labelstudio.annotations import (AnnotationError, bitmask_mask, label_map, rectangle_mask,
                                                  region_mask, result_masks)
from gem_backend.labelstudio.brush import mask2rle

H, W = 30, 40


def envelope(kind, value, labels, **kw):
    out = {"from_name": "tag", "to_name": "image", "type": kind, "original_width": W, "original_height": H,
           "value": dict(value, **{kind: labels})}
    out.update(kw)
    return out


def rgba_data_url(mask: np.ndarray) -> str:
    """What the Label Studio frontend writes: RGBA, black opaque inside, transparent outside."""
    rgba = np.zeros(mask.shape + (4,), np.uint8)
    rgba[mask, 3] = 255
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_each_kind_decodes_to_its_pixels():
    cat = np.zeros((H, W), np.bool_)
    cat[2:10, 3:12] = True
    brush = envelope("brushlabels", {"format": "rle", "rle": mask2rle(cat.astype(np.uint8) * 255)}, ["cat"])
    labels, mask = region_mask(brush)
    assert labels == ["cat"] and np.array_equal(mask, cat)

    bitmask = envelope("bitmasklabels", {"imageDataURL": rgba_data_url(cat)}, ["cat"])
    assert np.array_equal(region_mask(bitmask)[1], cat)

    # a box from column 3 to 12, row 2 to 10 (percent of 40 x 30)
    box = envelope("rectanglelabels", {"x": 3 / W * 100, "y": 2 / H * 100, "width": 9 / W * 100,
                                       "height": 8 / H * 100, "rotation": 0}, ["cat"])
    assert np.array_equal(region_mask(box)[1], cat)

    square = [[10, 10], [50, 10], [50, 50], [10, 50]]
    poly = region_mask(envelope("polygonlabels", {"points": square}, ["dog"]))[1]
    assert poly[10, 10] and not poly[0, 0] and abs(int(poly.sum()) - 16 * 12) <= 16 + 12 + 1


def test_rotated_rectangle_turns_about_its_top_left_corner():
    m = rectangle_mask({"x": 50, "y": 10, "width": 20, "height": 10, "rotation": 90}, 100, 100)
    # rotated 90 degrees clockwise (y down): it now extends left of x = 50, below y = 10
    assert m[15, 45] and not m[15, 55] and m[25, 41]


def test_label_map_later_region_wins_and_unknown_labels_are_ignored():
    a = np.zeros((H, W), np.bool_)
    a[0:20, 0:20] = True
    b = np.zeros((H, W), np.bool_)
    b[10:30, 10:30] = True
    results = [envelope("bitmasklabels", {"imageDataURL": rgba_data_url(a)}, ["cat"]),
               envelope("bitmasklabels", {"imageDataURL": rgba_data_url(b)}, ["dog"]),
               envelope("bitmasklabels", {"imageDataURL": rgba_data_url(a)}, ["bird"]),
               envelope("brushlabels", {"rle": mask2rle(a.astype(np.uint8) * 255)}, ["cat"], to_name="other")]
    out, problems = label_map(results, ["cat", "dog"], "image", (H, W))
    assert problems == []
    assert out.dtype == np.uint16
    assert out[5, 5] == 1 and out[15, 15] == 2 and out[25, 25] == 2 and out[25, 2] == 0
    masks, _ = result_masks(results, "image")
    assert set(masks) == {"cat", "dog", "bird"} and masks["cat"][15, 15]


@pytest.mark.parametrize("url, why", [
    ("data:image/jpeg;base64,AAAA", "not a PNG data URL"),
    ("data:image/png;base64,@@@", "base64"),
    ("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode(), "cannot be decoded"),
])
def test_bad_bitmasks_are_reported(url, why):
    with pytest.raises(AnnotationError, match=why):
        bitmask_mask(url)


def test_bitmask_of_another_size_is_refused_and_skipped_with_a_reason():
    small = rgba_data_url(np.ones((5, 5), np.bool_))
    with pytest.raises(AnnotationError, match="5x5"):
        bitmask_mask(small, H, W)
    out, problems = label_map([envelope("bitmasklabels", {"imageDataURL": small}, ["cat"])], ["cat"], "image", (H, W))
    assert not out.any() and len(problems) == 1 and "5x5" in problems[0]

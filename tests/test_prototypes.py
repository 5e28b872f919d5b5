"""gem_backend.serving.prototypes: masks -> patch sums, exact add/update/delete arithmetic in every store
(memory, files, a real Redis), per-project isolation, tombstones, the blend and its weight, the
coarse digest, and annotation results (RLE round trip with our encoder, polygons, malformed ones)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from gem_backend.labelstudio.brush import mask2rle
from gem_backend.serving.prototypes import (BACKGROUND_KEY, FIXED_POINT, Contribution, FilePrototypeStore, LabelSum,
                                    MemoryPrototypeStore, RedisPrototypeStore, active_prototypes, apply_contribution,
                                    blend_weight, contribution_from_masks, grid_fractions, prototype_digest,
                                    result_masks)
from gem_backend.algorithm.segmentation import ImageEmbedding, SegmentationSettings, blend_prototypes

D = 8


def contribution(rng, labels=("cat", "dog"), stamp="") -> Contribution:
    """Random sums of up to 50 unit tokens per label, as contribution_from_masks makes them."""
    out = Contribution(stamp=stamp)
    for label in labels:
        n = int(rng.integers(1, 50))
        tokens = rng.normal(size=(n, D))
        tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
        out.labels[label] = LabelSum(n, np.rint(tokens.sum(0) * FIXED_POINT).astype(np.int64))
    return out


def expected_totals(contributions) -> dict:
    out = {}
    for c in contributions:
        out = apply_contribution(out, None, c)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].annotations == b[k].annotations and a[k].patches == b[k].patches
        np.testing.assert_array_equal(a[k].sum, b[k].sum)  # exact: integers


@pytest.fixture(params=["memory", "files", "redis"])
def store(request, tmp_path):
    if request.param == "memory":
        return MemoryPrototypeStore()
    if request.param == "files":
        return FilePrototypeStore(tmp_path, "ns")
    return RedisPrototypeStore(request.getfixturevalue("redis_url"), "ns")


# ----------------------------------------------------------------------------------- arithmetic
def test_add_update_delete_are_exact(store):
    rng = np.random.default_rng(0)
    a, b, c = contribution(rng), contribution(rng, ("cat",)), contribution(rng, ("dog", "bird"))
    assert store.put(3, 1, a) and store.put(3, 2, b) and store.put("3.1716", 3, c)  # LS's "<id>.<stamp>" too
    assert_same(store.totals(3), expected_totals([a, b, c]))
    assert store.totals(3)["cat"].annotations == 2 and store.totals(3)["bird"].annotations == 1

    a2 = contribution(rng, ("bird",))
    assert store.put(3, 1, a2)  # update: a's part is replaced, exactly
    assert_same(store.totals(3), expected_totals([a2, b, c]))
    assert store.annotation_ids(3) == {"1", "2", "3"}
    assert store.contribution(3, 1).labels.keys() == {"bird"}

    assert store.remove(3, [2, 99]) == 1  # 99 was never stored
    assert_same(store.totals(3), expected_totals([a2, c]))
    assert store.remove(3, [1, 3]) == 2
    assert store.totals(3) == {}  # every sum back to exactly zero: the labels are gone
    assert store.annotation_ids(3) == set()


def test_deleted_annotations_stay_deleted_and_older_copies_lose(store):
    rng = np.random.default_rng(1)
    new = contribution(rng, stamp="2026-11-27T22:30:49.783571Z")
    old = contribution(rng, stamp="2026-11-27T22:30:49.541572Z")
    assert store.put(1, 7, new)
    assert not store.put(1, 7, old)  # a late CREATED after the UPDATED (two workers): ignored
    assert_same(store.totals(1), expected_totals([new]))
    store.remove(1, [7])
    assert not store.put(1, 7, new)  # handled after the DELETED: does not come back
    assert store.totals(1) == {}


def test_projects_never_mix(store):
    rng = np.random.default_rng(2)
    store.put(1, 1, contribution(rng))
    assert store.totals(2) == {} and store.annotation_ids(2) == set()
    store.remove(2, [1])  # deleting annotation 1 of project 2 leaves project 1 alone
    assert store.annotation_ids(1) == {"1"}
    assert not store.put(2, 1, contribution(rng))  # tombstoned in project 2 only
    assert store.put(1, 1, contribution(rng))
    assert store.totals(2) == {}


def test_bad_ids_are_refused(store):
    with pytest.raises(ValueError):
        store.put("../etc", 1, Contribution())
    with pytest.raises(ValueError):
        store.put(1, "a/b", Contribution())


def test_concurrent_updates_lose_nothing(store):
    rng = np.random.default_rng(3)
    items = [contribution(rng) for _ in range(24)]

    def work(part):
        for i in part:
            store.put(5, i, items[i])

    threads = [threading.Thread(target=work, args=(range(k, 24, 3),)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert_same(store.totals(5), expected_totals(items))


def test_file_store_is_shared_by_two_instances(tmp_path):
    rng = np.random.default_rng(4)
    one, two = FilePrototypeStore(tmp_path, "ns"), FilePrototypeStore(tmp_path, "ns")
    c = contribution(rng)
    one.put(1, 1, c)
    assert_same(two.totals(1), expected_totals([c]))
    assert FilePrototypeStore(tmp_path, "other-model").totals(1) == {}  # another feature space


# ----------------------------------------------------------------------------------- masks -> sums
def test_grid_fractions_are_area_fractions():
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True          # top-left cell of a 2x2 grid, fully
    mask[:2, 4:8] = True         # half of the top-right cell
    mask[7, 7] = True            # 1/16 of the bottom-right cell
    np.testing.assert_allclose(grid_fractions(mask, (2, 2)), [[1.0, 0.5], [0.0, 1 / 16]], atol=1e-6)
    # any resolution and aspect of the mask: only the relative area counts
    big = np.kron(mask, np.ones((3, 5), bool))
    np.testing.assert_allclose(grid_fractions(big, (2, 2)), [[1.0, 0.5], [0.0, 1 / 16]], atol=1e-6)


def embedding(tokens: np.ndarray, grid) -> ImageEmbedding:
    return ImageEmbedding(patches=torch.from_numpy(tokens.astype(np.float32)), grid=grid, input_size=(0, 0),
                          original_size=(8, 8))


def test_contribution_takes_patches_mostly_inside_and_background_entirely_outside():
    tokens = np.eye(4, D)  # patch i is the unit vector e_i
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True       # patch 0 fully
    mask[:1, 4:8] = True      # patch 1: 1/4 inside: not the label's, not background either
    c = contribution_from_masks(embedding(tokens, (2, 2)), {"cat": mask})
    assert c.labels["cat"].patches == 1
    np.testing.assert_array_equal(c.labels["cat"].sum, np.rint(tokens[0] * FIXED_POINT))
    assert c.labels[BACKGROUND_KEY].patches == 2  # patches 2 and 3
    np.testing.assert_array_equal(c.labels[BACKGROUND_KEY].sum, np.rint((tokens[2] + tokens[3]) * FIXED_POINT))
    assert BACKGROUND_KEY not in contribution_from_masks(embedding(tokens, (2, 2)), {"cat": mask},
                                                         background=False).labels


def test_a_region_smaller_than_half_a_patch_counts_by_its_best_patch():
    tokens = np.eye(4, D)
    mask = np.zeros((8, 8), bool)
    mask[5:7, 5:7] = True  # 4/16 of patch 3
    c = contribution_from_masks(embedding(tokens, (2, 2)), {"dot": mask})
    assert c.labels["dot"].patches == 1
    np.testing.assert_array_equal(c.labels["dot"].sum, np.rint(tokens[3] * FIXED_POINT))
    assert contribution_from_masks(embedding(tokens, (2, 2)), {"none": np.zeros((8, 8), bool)}).labels == {}


# ----------------------------------------------------------------------------------- annotation results
def brush(mask: np.ndarray, label: str, to_name="image") -> dict:
    h, w = mask.shape
    return {"from_name": "tag", "to_name": to_name, "type": "brushlabels", "original_width": w,
            "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]}}


def test_rle_round_trip_polygons_and_malformed_results():
    rng = np.random.default_rng(5)
    cat = rng.random((30, 41)) < 0.3
    dog = np.zeros((30, 41), bool)
    dog[5:20, 10:30] = True
    polygon = {"from_name": "poly", "to_name": "image", "type": "polygonlabels", "original_width": 41,
               "original_height": 30, "value": {"points": [[0, 0], [50, 0], [50, 50], [0, 50]],
                                                "polygonlabels": ["dog"]}}
    bad = brush(cat, "cat")
    bad["value"]["rle"] = bad["value"]["rle"][:7]  # truncated
    other_image = brush(cat, "cat", to_name="other")
    wrong_size = brush(cat, "cat")
    wrong_size["original_width"] = 40
    no_label = brush(cat, "cat")
    no_label["value"]["brushlabels"] = []
    masks, problems = result_masks([brush(cat, "cat"), brush(dog, "dog"), polygon, bad, other_image, wrong_size,
                                    no_label, {"type": "choices"}], "image")
    np.testing.assert_array_equal(masks["cat"], cat)  # our encoder -> rle2mask -> the same mask
    square = np.zeros((30, 41), bool)
    square[:15, :20] = True  # 0..50 % of 41 x 30, the edge pixel rounding aside
    assert (masks["dog"] == (dog | square)).mean() > 0.97
    assert masks["dog"][:14, :20].all() and masks["dog"][5:20, 10:30].all()
    assert len(problems) == 3 and "bad RLE" in problems[0] and "decodes to" in problems[1] and "label" in problems[2]


# ----------------------------------------------------------------------------------- use
def test_blend_weight_and_digest_are_coarse():
    assert blend_weight(2, 0.5, 3) == 0.0
    assert blend_weight(3, 0.5, 3) == pytest.approx(0.25)       # half the strength at n_min
    assert blend_weight(30, 0.5, 3) == pytest.approx(0.5 * 30 / 33)
    rng = np.random.default_rng(6)
    digests = []
    for n in range(1, 10):
        store = MemoryPrototypeStore()
        for i in range(n):
            store.put(1, i, contribution(rng, ("cat",)))
        totals = store.totals(1)
        digests.append(prototype_digest(totals, active_prototypes(totals, SegmentationSettings(
            prototypes=True, prototype_min_annotations=2))))
    assert digests[0] == ""                      # n = 1 < n_min: no prototype, no digest
    assert digests[1] == digests[2] != ""        # 2, 3
    assert digests[3] == digests[6] != digests[2]  # 4..7
    assert digests[7] == digests[8] != digests[6]  # 8, 9


def test_blend_is_the_documented_formula():
    rng = np.random.default_rng(7)
    text = rng.normal(size=(3, D)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    proto = rng.normal(size=D).astype(np.float32)
    proto /= np.linalg.norm(proto)
    out = blend_prototypes(text, ["cat", "dog", "sky"], {"cat": (proto, 0.3), BACKGROUND_KEY: (-proto, 1.0)},
                           background=["sky"])
    want = 0.7 * text[0] + 0.3 * proto
    np.testing.assert_allclose(out[0], want / np.linalg.norm(want), atol=1e-6)
    np.testing.assert_array_equal(out[1], text[1])
    np.testing.assert_allclose(out[2], -proto, atol=1e-6)

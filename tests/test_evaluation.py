"""The evaluation harness: metrics against hand-computed cases and an independent
implementation, every dataset reader on a tiny fake tree in its public layout, the
post-processing, and the whole ``gem-backend eval`` run on the real voc-mini photos with the
golden tiny random CLIP (whose numbers mean nothing), re-checked from the saved PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gem_backend import cli
from gem_backend.evaluation.datasets import (COCO_STUFF_CLASSES, DATASETS, DatasetError, OpenImagesV7, get_dataset,
                                  read_class_names, voc_palette)
from gem_backend.evaluation.harness import (Protocol, confusion_matrix, decide, point_metrics, point_scores, protocol_for,
                                    resized_size, segmentation_metrics, sliding_windows)
from helpers import GOLDEN, VOC_MINI, shared_path

NAN = float("nan")


# ---------------------------------------------------------------------------------- metrics
def test_confusion_matrix_and_iou_by_hand():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    cm = confusion_matrix(pred, gt, 4)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 0] = 1, 1, 2, 1  # the 255 pixel is not counted
    np.testing.assert_array_equal(cm, expected)
    m = segmentation_metrics(cm)
    # class 0: TP 1, GT 2, pred 2 -> 1/3; class 1: TP 2, GT 2, pred 3 -> 2/3; class 2: GT 1, pred 0 -> 0
    np.testing.assert_allclose(m["iou"][:3], [1 / 3, 2 / 3, 0.0])
    assert math.isnan(m["iou"][3])  # neither in GT nor predicted: left out of the mean
    assert m["mIoU"] == pytest.approx(1 / 3)
    assert m["aAcc"] == pytest.approx(3 / 5)
    assert m["mAcc"] == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_class_predicted_but_absent_counts_as_zero():
    gt = np.zeros((2, 2), dtype=np.uint8)
    pred = np.array([[0, 0], [0, 1]])
    m = segmentation_metrics(confusion_matrix(pred, gt, 3))
    np.testing.assert_allclose(m["iou"][:2], [3 / 4, 0.0])
    assert math.isnan(m["iou"][2])
    assert m["mIoU"] == pytest.approx((3 / 4 + 0) / 2)


def test_all_ignored_gives_nan_not_an_error():
    m = segmentation_metrics(confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 255), 2))
    assert math.isnan(m["mIoU"]) and math.isnan(m["aAcc"])


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 2)
    with pytest.raises(ValueError):
        confusion_matrix(np.full((2, 2), 2), np.zeros((2, 2)), 2)
    with pytest.raises(ValueError):
        confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 7), 2)


def _independent_miou(preds, gts, num_classes, ignore=255):
    """Per-class IoU from Python sets of pixel coordinates, summed over images (no matrix)."""
    inter = [0] * num_classes
    union = [0] * num_classes
    for k, (pred, gt) in enumerate(zip(preds, gts)):
        for c in range(num_classes):
            p_set = {(k, i, j) for i in range(gt.shape[0]) for j in range(gt.shape[1])
                     if gt[i, j] != ignore and pred[i, j] == c}
            g_set = {(k, i, j) for i in range(gt.shape[0]) for j in range(gt.shape[1]) if gt[i, j] == c}
            inter[c] += len(p_set & g_set)
            union[c] += len(p_set | g_set)
    ious = [inter[c] / union[c] if union[c] else None for c in range(num_classes)]
    valid = [v for v in ious if v is not None]
    return ious, sum(valid) / len(valid)


def test_dataset_miou_matches_an_independent_implementation():
    rng = np.random.default_rng(0)
    num_classes = 6
    preds, gts = [], []
    for _ in range(5):
        gt = rng.integers(0, num_classes - 1, size=(7, 9))  # class 5 never in GT
        gt[rng.random(gt.shape) < 0.2] = 255
        pred = np.where(rng.random(gt.shape) < 0.6, np.where(gt == 255, 0, gt), rng.integers(0, 4, size=gt.shape))
        preds.append(pred)
        gts.append(gt)
    cm = sum(confusion_matrix(p, g, num_classes) for p, g in zip(preds, gts))
    m = segmentation_metrics(cm)
    ious, miou = _independent_miou(preds, gts, num_classes)
    for c in range(num_classes):
        if ious[c] is None:
            assert math.isnan(m["iou"][c])
        else:
            assert m["iou"][c] == pytest.approx(ious[c], abs=1e-12)
    assert m["mIoU"] == pytest.approx(miou, abs=1e-12)
    # summing per-image matrices is the same as one matrix of all pixels
    flat = confusion_matrix(np.concatenate([p.ravel() for p in preds]), np.concatenate([g.ravel() for g in gts]),
                            num_classes)
    np.testing.assert_array_equal(cm, flat)


def test_point_metrics_by_hand():
    # class 0: 2 yes hit, 1 yes missed, 1 no hit -> 2 / (2 + 1 + 1); class 1: only a 'no' point rejected -> NaN
    m = point_metrics(tp=[2, 0], fp=[1, 0], fn=[1, 0], tn=[0, 1])
    assert m["iou"][0] == pytest.approx(0.5)
    assert math.isnan(m["iou"][1])
    assert m["mIoU"] == pytest.approx(0.5)
    assert m["aAcc"] == pytest.approx(3 / 5)


# ---------------------------------------------------------------------------------- geometry, decision
def test_sliding_windows_follow_sclip():
    boxes = sliding_windows(336, 448, 224, 112)
    assert boxes == [(0, 224, 0, 224), (0, 224, 112, 336), (0, 224, 224, 448),
                     (112, 336, 0, 224), (112, 336, 112, 336), (112, 336, 224, 448)]
    cover = np.zeros((350, 500), dtype=int)
    for y1, y2, x1, x2 in sliding_windows(350, 500, 224, 112):
        assert y2 - y1 == 224 and x2 - x1 == 224
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1  # every pixel is seen; the last windows end flush with the border
    assert sliding_windows(100, 150, 224, 112) == [(0, 100, 0, 150)]


def test_resize_rules():
    short = Protocol("t", resize="short", size=336)
    assert resized_size(375, 500, short) == (336, 448)
    assert resized_size(1024, 2048, Protocol("t", resize="short", size=560)) == (560, 1120)
    assert resized_size(100, 5000, short) == (41, 2048)  # the long side cap wins
    assert resized_size(512, 1024, Protocol("t", resize="fit", size=448)) == (224, 448)
    assert resized_size(375, 500, Protocol("t", resize="square", size=448)) == (448, 448)
    assert resized_size(375, 500, Protocol("t", resize="none")) == (375, 500)


def test_protocol_presets():
    gem = protocol_for("gem", "voc21")
    assert (gem.resize, gem.size, gem.crop, gem.templates, gem.prob_thd) == ("square", 448, 0, ("a photo of a {}.",), 0)
    s = protocol_for("sclip", "voc21")
    assert (s.resize, s.size, s.crop, s.stride, len(s.templates)) == ("short", 336, 224, 112, 80)
    assert (s.logit_scale, s.prob_thd, s.area_thd) == (65.0, 0.1, 0.1)
    assert protocol_for("sclip", "coco-stuff").size == 448
    assert protocol_for("sclip", "cityscapes").size == 560
    assert (protocol_for("sclip", "ade20k").logit_scale, protocol_for("sclip", "ade20k").prob_thd) == (40.0, 0.0)
    assert protocol_for("sclip", "loveda").resize == "fit"
    c = protocol_for("clearclip", "voc21")
    assert (c.size, c.crop, c.stride, c.prob_thd, c.prompts[0]) == (448, 448, 224, 0.5, ("background",))
    with pytest.raises(ValueError):
        protocol_for("nope", "voc21")


def test_decide_takes_the_best_name_of_each_class():
    logits = torch.zeros(3, 1, 2)
    logits[1, 0, 0] = 1.0  # the second name of class 0 wins pixel 0
    logits[2, 0, 1] = 1.0  # class 1 wins pixel 1
    pred = decide(logits, torch.tensor([0, 0, 1]), 2, logit_scale=10.0)
    assert pred.tolist() == [[0, 1]]


def test_decide_thresholds_to_background():
    logits = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 0.02]]])  # pixel 1 is a near tie
    pred = decide(logits, torch.arange(3), 3, logit_scale=10.0, prob_thd=0.5, background=0)
    assert pred.tolist() == [[1, 0]]
    with pytest.raises(ValueError):
        decide(logits, torch.arange(3), 3, logit_scale=10.0, prob_thd=0.5)


def test_decide_area_filter_drops_small_classes():
    logits = torch.zeros(3, 1, 10)
    logits[1, 0, :9] = 1.0   # class 1 on 9 pixels
    logits[2, 0, 9] = 1.0    # class 2 on 1 pixel: 10 % of the foreground, not above it
    pred = decide(logits, torch.arange(3), 3, logit_scale=50.0, area_thd=0.1, background=0)
    assert pred[0, 9].item() != 2
    assert pred[0, :9].tolist() == [1] * 9


def test_point_scores_sample_the_upsampled_map():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    x = torch.tensor([0.25, 0.75, 0.5])
    y = torch.tensor([0.25, 0.75, 0.5])
    s = point_scores(maps, x, y, torch.zeros(3, dtype=torch.long), mode="minmax")
    np.testing.assert_allclose(s.numpy(), [0.0, 1.0, 0.5], atol=1e-6)
    raw = point_scores(maps, x, y, torch.zeros(3, dtype=torch.long), mode="cosine")
    np.testing.assert_allclose(raw.numpy(), [0.0, 3.0, 1.5], atol=1e-6)


# ---------------------------------------------------------------------------------- fake dataset trees
def _img(path: Path, size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 255, (size[0], size[1], 3), dtype=np.uint8)).save(path)


def _label(path: Path, values, mode="L") -> np.ndarray:
    """An 8x8 label whose rows cycle through ``values`` (index PNG, or palette with mode P)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.array([[values[i % len(values)]] * 8 for i in range(8)], dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode == "P":
        im.putpalette(voc_palette().ravel().tolist())  # 'L' -> 'P', the values stay the indices
    im.save(path)
    return arr


def _rgb_label(path: Path, colours) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.array([[colours[i % len(colours)]] * 8 for i in range(8)], dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _rows(sample) -> list[int]:
    return [int(v) for v in sample.load_label()[:, 0]]


def test_voc_readers(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    (base / "ImageSets/Segmentation").mkdir(parents=True)
    (base / "ImageSets/Segmentation/val.txt").write_text("2007_000033\n2007_000042\n")
    for name in ("2007_000033", "2007_000042"):
        _img(base / "JPEGImages" / f"{name}.jpg")
    _label(base / "SegmentationClass/2007_000033.png", [0, 15, 255, 20], mode="P")
    # an RGB copy of a VOC mask (some mirrors convert them) decodes by the VOC colours
    pal = voc_palette()
    _rgb_label(base / "SegmentationClass/2007_000042.png", [tuple(pal[1]), tuple(pal[255]), tuple(pal[0])])
    voc21 = DATASETS["voc21"].samples(tmp_path)  # the parent of VOCdevkit works too
    assert [s.name for s in voc21] == ["2007_000033", "2007_000042"]
    assert _rows(voc21[0])[:4] == [0, 15, 255, 20]
    assert _rows(voc21[1])[:3] == [1, 255, 0]
    voc20 = DATASETS["voc20"].samples(base)
    assert _rows(voc20[0])[:4] == [255, 14, 255, 19]  # background ignored, classes shifted down
    assert len(DATASETS["voc20"].classes) == 20 and DATASETS["voc20"].classes[0] == "aeroplane"


def test_context_readers(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    (base / "ImageSets/SegmentationContext").mkdir(parents=True)
    (base / "ImageSets/SegmentationContext/val.txt").write_text("2008_000002\n")
    _img(base / "JPEGImages/2008_000002.jpg")
    _label(base / "SegmentationClassContext/2008_000002.png", [0, 5, 59])
    assert _rows(DATASETS["context60"].samples(tmp_path)[0])[:3] == [0, 5, 59]
    assert _rows(DATASETS["context59"].samples(tmp_path)[0])[:3] == [255, 4, 58]
    assert len(DATASETS["context60"].classes) == 60 and len(DATASETS["context59"].classes) == 59


def test_ade20k_reader_shifts_zero_to_ignore(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    _img(base / "images/validation/ADE_val_00000001.jpg")
    _label(base / "annotations/validation/ADE_val_00000001.png", [0, 1, 150])
    s = DATASETS["ade20k"].samples(tmp_path)
    assert [x.name for x in s] == ["ADE_val_00000001"]
    assert _rows(s[0])[:3] == [255, 0, 149]
    assert len(DATASETS["ade20k"].classes) == 150


def test_coco_stuff_and_object_readers(tmp_path):
    base = tmp_path / "coco_stuff164k"
    _img(base / "images/val2017/000000000139.jpg")
    _img(base / "images/val2017/000000000285.jpg")
    # raw stuffthingmaps: 0 person, 12 stop sign, 91 banner, 181 wood, 255 unlabeled
    _label(base / "annotations/val2017/000000000139.png", [0, 12, 91, 181, 255])
    # mmseg's converted trainIds beside a raw map: the converted one is used
    _label(base / "annotations/val2017/000000000285.png", [1, 1, 1])
    _label(base / "annotations/val2017/000000000285_labelTrainIds.png", [11, 170, 255])
    stuff = DATASETS["coco-stuff"].samples(tmp_path)
    assert len(COCO_STUFF_CLASSES) == 171
    assert COCO_STUFF_CLASSES[11] == "stop sign" and COCO_STUFF_CLASSES[80] == "banner"
    assert _rows(stuff[0])[:5] == [0, 11, 80, 170, 255]
    assert _rows(stuff[1])[:3] == [11, 170, 255]
    obj = DATASETS["coco-object"].samples(base)
    assert _rows(obj[0])[:5] == [1, 12, 0, 0, 0]  # things 1..80; stuff and unlabeled are background
    assert _rows(obj[1])[:3] == [12, 0, 0]
    assert len(DATASETS["coco-object"].classes) == 81


def test_cityscapes_reader_maps_ids_to_train_ids(tmp_path):
    base = tmp_path / "cityscapes"
    _img(base / "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png")
    _label(base / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png", [7, 26, 0, 33, 9])
    _img(base / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png")
    _label(base / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png", [18, 255])
    s = DATASETS["cityscapes"].samples(tmp_path)
    assert [x.name for x in s] == ["frankfurt_000000_000294_leftImg8bit", "lindau_000000_000019_leftImg8bit"]
    assert _rows(s[0])[:5] == [0, 13, 255, 18, 255]  # road, car, unlabeled, bicycle, parking (ignored)
    assert _rows(s[1])[:2] == [18, 255]


def test_loveda_readers(tmp_path):
    mm = tmp_path / "mm" / "LoveDA"
    _img(mm / "img_dir/val/3514.png")
    _label(mm / "ann_dir/val/3514.png", [0, 1, 7])
    assert _rows(DATASETS["loveda"].samples(tmp_path / "mm")[0])[:3] == [255, 0, 6]  # 0 = no-data
    raw = tmp_path / "raw"
    for domain, name in (("Urban", "3514"), ("Rural", "2522")):
        _img(raw / f"Val/{domain}/images_png/{name}.png")
        _label(raw / f"Val/{domain}/masks_png/{name}.png", [2, 0])
    s = DATASETS["loveda"].samples(raw)
    assert sorted(x.name for x in s) == ["2522", "3514"]
    assert _rows(s[0])[:2] == [1, 255]


@pytest.mark.parametrize("name", ["potsdam", "vaihingen"])
def test_isprs_readers_index_and_rgb(tmp_path, name):
    base = tmp_path / name
    _img(base / "img_dir/val/2_13_0_0_512_512.png")
    _label(base / "ann_dir/val/2_13_0_0_512_512.png", [0, 1, 6])
    _img(base / "img_dir/val/2_13_256_0_768_512.png")
    _rgb_label(base / "ann_dir/val/2_13_256_0_768_512.png",
               [(255, 255, 255), (0, 0, 255), (255, 0, 0), (0, 0, 0), (255, 255, 0)])
    s = DATASETS[name].samples(tmp_path)
    assert [x.name for x in s] == ["2_13_0_0_512_512", "2_13_256_0_768_512"]
    assert _rows(s[0])[:3] == [255, 0, 5]
    assert _rows(s[1])[:5] == [0, 1, 5, 255, 4]  # impervious, building, clutter, boundary, car
    assert DATASETS[name].background == 5


def test_isaid_reader_index_and_rgb(tmp_path):
    base = tmp_path / "iSAID"
    _img(base / "img_dir/val/P0003_0_896_0_896.png")
    _label(base / "ann_dir/val/P0003_0_896_0_896_instance_color_RGB.png", [0, 14, 255], mode="P")
    _img(base / "img_dir/val/P0004_0_896_0_896.png")
    _rgb_label(base / "ann_dir/val/P0004_0_896_0_896_instance_color_RGB.png", [(0, 127, 255), (0, 0, 63), (9, 9, 9)])
    s = DATASETS["isaid"].samples(tmp_path)
    assert _rows(s[0])[:3] == [0, 14, 255]
    assert _rows(s[1])[:3] == [14, 1, 0]  # unknown colours are background, as mmseg's converter
    assert len(DATASETS["isaid"].classes) == 16


def _fake_openimages(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "oidv7-class-descriptions.csv").write_text("LabelName,DisplayName\n/m/01g317,Person\n/m/0k4j,Car\n")
    (root / "oidv7-val-annotations-point-labels.csv").write_text(
        "ImageId,X,Y,Label,EstimatedYesNo,Source,YesVotes,NoVotes,UnsureVotes,TextLabel\n"
        "aa01,0.25,0.25,/m/01g317,yes,ih,3,0,0,\n"
        "aa01,0.75,0.75,/m/01g317,no,ih,0,3,0,\n"
        "aa01,0.5,0.5,/m/0k4j,unsure,ih,1,1,1,\n"
        "aa01,0.1,0.9,/m/0k4j,yes,ih,2,0,0,\n"
        "bb02,0.5,0.5,/m/09xyz,no,ih,0,2,0,\n"
        "cc03,0.5,0.5,/m/0k4j,yes,ih,2,0,0,\n")  # cc03 has no image: skipped
    _img(root / "validation/aa01.jpg", size=(40, 48))
    _img(root / "validation/bb02.jpg", size=(32, 32))


def test_openimages_reader(tmp_path):
    _fake_openimages(tmp_path / "oi")
    oi = OpenImagesV7(tmp_path / "oi")
    s = oi.samples()
    assert [x.name for x in s] == ["aa01", "bb02"]
    p = s[0].points
    assert p.positive.tolist() == [True, False, True]  # the 'unsure' point is dropped
    assert [oi.names[c] for c in p.cls] == ["Person", "Person", "Car"]
    assert oi.names[s[1].points.cls[0]] == "/m/09xyz"  # no description: the MID is the name
    np.testing.assert_allclose(p.x, [0.25, 0.75, 0.1])


def test_missing_layouts_say_what_was_expected(tmp_path):
    for name, spec in DATASETS.items():
        if spec.kind != "semantic":
            continue
        with pytest.raises(DatasetError) as err:
            spec.samples(tmp_path)
        assert str(tmp_path) in str(err.value), name
    with pytest.raises(DatasetError):
        OpenImagesV7(tmp_path)
    with pytest.raises(ValueError):
        get_dataset("pascal")


def test_class_name_files(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("sky, wall,tree\naeroplane\n\nperson, person in shirt\n")
    assert read_class_names(f) == (("sky", "wall", "tree"), ("aeroplane",), ("person", "person in shirt"))


def test_every_dataset_has_prompts_for_each_class():
    for spec in DATASETS.values():
        assert len(spec.prompts) == len(spec.classes)
        assert all(group and all(n.strip() for n in group) for group in spec.prompts)


# ---------------------------------------------------------------------------------- end to end on voc-mini
def _model_args():
    shared_path("golden", "gem-reference", "weights.safetensors")
    return ["--model", str(GOLDEN / "config.json"), "--pretrained", str(GOLDEN / "weights.safetensors"),
            "--device", "cpu", "--precision", "fp32", "--no-progress"]


def _recompute_miou(pred_dir: Path, names, num_classes=21):
    """mIoU from the saved PNGs and the official GT PNGs, with boolean masks per class."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for name in names:
        pred = np.array(Image.open(pred_dir / f"{name}.png"))
        gt = np.array(Image.open(VOC_MINI / "VOC2012/SegmentationClass" / f"{name}.png"))
        valid = gt != 255
        for c in range(num_classes):
            inter[c] += np.sum((pred == c) & (gt == c) & valid)
            union[c] += np.sum(((pred == c) | (gt == c)) & valid)
    iou = [inter[c] / union[c] * 100 for c in range(num_classes) if union[c] > 0]
    return sum(iou) / len(iou), {c: inter[c] / union[c] * 100 for c in range(num_classes) if union[c] > 0}


def test_voc_mini_end_to_end_resume_and_recheck(tmp_path, capsys):
    shared_path("data", "voc-mini", "VOC2012", "ImageSets", "Segmentation", "val.txt")
    names = (VOC_MINI / "VOC2012/ImageSets/Segmentation/val.txt").read_text().split()
    assert len(DATASETS["voc21"].samples(VOC_MINI)) == len(names) == 17
    out, pred = tmp_path / "run", tmp_path / "pred"
    base = ["eval", "--dataset", "voc21", "--root", str(VOC_MINI), "--input-size", "224",
            "--out", str(out), "--save-predictions", str(pred)] + _model_args()
    assert cli.main(base + ["--limit", "3"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["images"] == 3 and first["images_from_cache"] == 0
    assert first["random_weights"] is True and "mean nothing" in first["warning"]
    assert "Random weights" in (out / "results.md").read_text()
    assert "| mIoU |" in capsys.readouterr().out
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cache").glob("*.npz")}
    assert len(stamps) == 3

    # resume: the three cached images are not recomputed, the next two are
    assert cli.main(base + ["--limit", "5"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["images"] == 5 and res["images_from_cache"] == 3
    assert all((out / "cache" / n).stat().st_mtime_ns == t for n, t in stamps.items())

    # predictions: palette PNGs named like the inputs, at the input size
    saved = sorted(p.stem for p in pred.glob("*.png"))
    assert saved == sorted(names[:5])
    for name in names[:5]:
        im = Image.open(pred / f"{name}.png")
        assert im.mode == "P"
        assert im.size == Image.open(VOC_MINI / "VOC2012/JPEGImages" / f"{name}.jpg").size

    # the check we keep: mIoU recomputed from the saved PNGs against the GT PNGs is the same
    miou, per_class = _recompute_miou(pred, names[:5])
    assert res["mIoU"] == pytest.approx(miou, abs=1e-9)
    for c, iou in per_class.items():
        assert res["per_class"][c]["iou"] == pytest.approx(iou, abs=1e-9)
    assert res["classes_in_mean"] == len(per_class)

    # other settings in the same folder are refused, --overwrite starts afresh
    assert cli.main(base + ["--limit", "5", "--prob-thd", "0.2"]) == 2
    assert cli.main(base + ["--limit", "1", "--prob-thd", "0.2", "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["images_from_cache"] == 0


def test_sclip_protocol_and_clip_method_run(tmp_path):
    out = tmp_path / "sclip"
    args = ["eval", "--dataset", "voc20", "--root", str(VOC_MINI), "--protocol", "sclip", "--method", "clip",
            "--templates", "a photo of a {}.|a picture of a {}.", "--input-size", "160", "--crop", "96",
            "--stride", "48", "--limit", "2", "--out", str(out)] + _model_args()
    assert cli.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"] == "sclip" and res["method"] == "clip" and res["images"] == 2
    assert res["settings"]["crop"] == 96 and res["settings"]["resize"] == "short"
    assert len(res["per_class"]) == 20
    assert 0.0 <= res["aAcc"] <= 100.0


def test_threshold_on_a_dataset_without_background_is_refused(tmp_path):
    args = ["eval", "--dataset", "voc20", "--root", str(VOC_MINI), "--prob-thd", "0.3", "--limit", "1",
            "--out", str(tmp_path / "x")] + _model_args()
    assert cli.main(args) == 2


def test_openimages_point_evaluation_runs(tmp_path):
    root = tmp_path / "oi"
    _fake_openimages(root)
    out = tmp_path / "oi-run"
    args = ["eval", "--dataset", "openimages-v7", "--root", str(root), "--input-size", "64", "--out", str(out),
            "--save-predictions", str(tmp_path / "oi-pred")] + _model_args()
    assert cli.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["images"] == 2
    by_name = {c["name"]: c for c in res["per_class"]}
    assert by_name["Person"]["yes_points"] == 1 and by_name["Person"]["no_points"] == 1
    assert by_name["Car"]["yes_points"] == 1 and by_name["/m/09xyz"]["no_points"] == 1
    saved = json.loads((tmp_path / "oi-pred" / "aa01.json").read_text())
    assert len(saved["points"]) == 3
    # IoU recomputed from the saved point decisions
    for name, c in by_name.items():
        pts = [p for f in (tmp_path / "oi-pred").glob("*.json") for p in json.loads(f.read_text())["points"]
               if p["name"] == name]
        tp = sum(p["yes"] and p["predicted"] for p in pts)
        fp = sum((not p["yes"]) and p["predicted"] for p in pts)
        fn = sum(p["yes"] and not p["predicted"] for p in pts)
        expected = None if tp + fp + fn == 0 else tp / (tp + fp + fn) * 100
        assert c["iou"] == (pytest.approx(expected) if expected is not None else None)

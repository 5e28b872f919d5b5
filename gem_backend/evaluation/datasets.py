"""Readers for the public semantic-segmentation benchmarks, in the layouts their downloads have.

Each reader turns a dataset root into a list of :class:`Sample`; a sample's ``load_label()``
returns the ground truth as ``[H, W]`` uint8 class indices ``0..C-1`` in the order of
:attr:`DatasetSpec.classes`, with :data:`IGNORE` (255) where a pixel is not scored. Every
label encoding (palette PNGs, reduce-zero-label, Cityscapes ids, COCO-Stuff's 182 raw ids,
RGB-coded remote-sensing masks) is decoded here, so the metric code only ever sees
``0..C-1`` and 255.

Class names and text prompts follow the published training-free configs (SCLIP for the
eight natural-image benchmarks, SegEarth-OV for the remote-sensing ones): ``prompts[c]`` is
the tuple of names whose text embeddings compete for class ``c`` (the class score is the
max over its names). OpenImages V7 is point-labelled: its samples carry points, not masks.

No data ships with the project; EVALUATION.md says where each download comes from.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

IGNORE = 255

__all__ = ["IGNORE", "Sample", "Points", "DatasetSpec", "DATASETS", "get_dataset", "dataset_names",
           "load_image", "voc_palette", "DatasetError", "read_class_names"]


class DatasetError(FileNotFoundError):
    """The dataset root does not have the layout the reader expects; the message says which."""


# ---------------------------------------------------------------------------------- samples
@dataclass
class Points:
    """Point labels of one image (OpenImages V7).

    Attributes:
        x, y: ``[P]`` float, the point positions in relative image coordinates ``[0, 1]``.
        cls: ``[P]`` int, index of the point's class in :attr:`DatasetSpec.classes`.
        positive: ``[P]`` bool, True for 'yes' (the class is there), False for 'no'.
    """

    x: np.ndarray
    y: np.ndarray
    cls: np.ndarray
    positive: np.ndarray


@dataclass
class Sample:
    """One evaluation image.

    Attributes:
        name: unique within the dataset; predictions are saved as ``<name>.png``.
        image_path: the RGB image file.
        label_path: the ground-truth file (None for point-labelled samples).
        decode: ``raw label array -> [H, W] uint8`` in ``0..C-1`` / 255.
        points: the point labels (OpenImages V7), else None.
    """

    name: str
    image_path: Path
    label_path: Path | None = None
    decode: Callable[[np.ndarray], np.ndarray] | None = None
    points: Points | None = None

    def load_label(self) -> np.ndarray:
        """``[H, W]`` uint8 class indices, 255 = ignore."""
        if self.label_path is None or self.decode is None:
            raise ValueError(f"{self.name} has no label map")
        with Image.open(self.label_path) as im:
            # 'P' and 'L' PNGs give their indices; RGB-coded masks come as [H, W, 3]
            raw = np.array(im if im.mode in ("P", "L", "I", "I;16", "RGB") else im.convert("RGB"))
        return self.decode(raw)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB. No EXIF rotation: the label maps are stored unrotated."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


# ---------------------------------------------------------------------------------- label decoding
def _lut(mapping: dict[int, int], default: int = IGNORE, size: int = 256) -> np.ndarray:
    lut = np.full(size, default, dtype=np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut


def _apply_lut(lut: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    def decode(raw: np.ndarray) -> np.ndarray:
        if raw.ndim != 2:
            raise ValueError(f"expected an index label map, got shape {raw.shape}")
        if raw.max(initial=0) >= len(lut):
            raise ValueError(f"label value {int(raw.max())} outside the encoding (< {len(lut)})")
        return lut[raw.astype(np.int64)]
    return decode


def _identity(num_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """Labels already ``0..C-1`` with 255 ignore; anything else is an error, not silently scored."""
    lut = _lut({i: i for i in range(num_classes)})
    lut[IGNORE] = IGNORE
    check = _apply_lut(lut)

    def decode(raw: np.ndarray) -> np.ndarray:
        bad = (raw >= num_classes) & (raw != IGNORE)
        if bad.any():
            raise ValueError(f"label values {sorted(set(np.unique(raw[bad]).tolist()))[:5]} are not classes "
                             f"0..{num_classes - 1} or {IGNORE}")
        return check(raw)
    return decode


def _reduce_zero(num_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """mmseg's ``reduce_zero_label``: 0 -> ignore, k -> k - 1 (for k in 1..C), 255 stays ignore."""
    return _apply_lut(_lut({k: k - 1 for k in range(1, num_classes + 1)}))


def _rgb_decoder(colours: Sequence[tuple[int, int, int]], values: Sequence[int], default: int,
                 index_decoder: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Decode RGB-coded masks by exact colour; index masks go to ``index_decoder``."""
    def decode(raw: np.ndarray) -> np.ndarray:
        if raw.ndim == 2:
            return index_decoder(raw)
        rgb = raw[..., :3].astype(np.int64)
        key = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        out = np.full(key.shape, default, dtype=np.uint8)
        for colour, value in zip(colours, values):
            out[key == ((colour[0] << 16) | (colour[1] << 8) | colour[2])] = value
        return out
    return decode


def voc_palette(n: int = 256) -> np.ndarray:
    """``[n, 3]`` uint8: the PASCAL VOC colour map (index bits spread over R, G, B)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def _voc_decoder(num_raw: int, index_decoder) -> Callable[[np.ndarray], np.ndarray]:
    # VOC masks are palette PNGs; an RGB copy (some mirrors convert them) is decoded by colour,
    # the VOC boundary colour (224, 224, 192) being index 255.
    pal = voc_palette()
    colours = [tuple(int(v) for v in pal[i]) for i in range(num_raw)] + [tuple(int(v) for v in pal[IGNORE])]
    rgb_to_raw = _rgb_decoder(colours, list(range(num_raw)) + [IGNORE], IGNORE, lambda a: a)

    def decode(raw: np.ndarray) -> np.ndarray:
        return index_decoder(rgb_to_raw(raw) if raw.ndim == 3 else raw)
    return decode


# ---------------------------------------------------------------------------------- class tables
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
# SCLIP's background name set (cls_voc21.txt, cls_coco_object.txt): stuff words competing as class 0
SCLIP_BACKGROUND = ("sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk",
                    "bed", "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf",
                    "curtain", "stair", "floor", "hill", "rail", "fence")
_PERSON = ("person", "person in shirt", "person in jeans", "person in dress", "person in sweater",
           "person in skirt", "person in jacket")
VOC20_PROMPTS = (("aeroplane",), ("bicycle",), ("bird",), ("ship",), ("bottle",), ("bus",), ("car",), ("cat",),
                 ("chair",), ("cow",), ("table",), ("dog",), ("horse",), ("motorbike",), _PERSON,
                 ("pottedplant",), ("sheep",), ("sofa",), ("train",),
                 ("television monitor", "tv monitor", "monitor", "television", "screen"))
VOC21_PROMPTS = (SCLIP_BACKGROUND,) + VOC20_PROMPTS
# ClearCLIP's cls_voc21.txt: one name per class and the literal word for background
CLEARCLIP_VOC21_PROMPTS = (("background",), ("aeroplane",), ("bicycle",), ("bird",), ("ship",), ("bottle",),
                           ("bus",), ("car",), ("cat",), ("chair",), ("cow",), ("table",), ("dog",), ("horse",),
                           ("motorbike",), ("person",), ("pottedplant",), ("sheep",), ("sofa",), ("train",),
                           ("tvmonitor",))

CONTEXT59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood")
CONTEXT60_CLASSES = ("background",) + CONTEXT59_CLASSES

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag")

COCO_THINGS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")
COCO_STUFF = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel",
    "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood")
COCO_STUFF_CLASSES = COCO_THINGS + COCO_STUFF  # 171, the order of mmseg's COCOStuffDataset
# COCO-Stuff's raw label ids (0-based COCO category id - 1) that no class uses
_COCO_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
_COCO_RAW_TO_171 = {raw: i for i, raw in enumerate(r for r in range(182) if r not in _COCO_UNUSED)}
COCO_OBJECT_CLASSES = ("background",) + COCO_THINGS
COCO_OBJECT_PROMPTS = ((SCLIP_BACKGROUND,) + ((_PERSON + ("body",)),)
                       + tuple((c,) for c in COCO_THINGS[1:]))

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
# Cityscapes labelIds -> trainIds (cityscapesScripts' labels.py); everything else is ignored
_CITYSCAPES_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                           25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

LOVEDA_CLASSES = ("background", "building", "road", "water", "barren", "forest", "agricultural")
LOVEDA_PROMPTS = (("background",), ("building", "roof", "house"), ("road",), ("water",), ("barren",),
                  ("forest",), ("agricultural",))
ISPRS_CLASSES = ("impervious surface", "building", "low vegetation", "tree", "car", "clutter")
POTSDAM_PROMPTS = (("road", "parking lot"), ("building",), ("low vegetation",), ("tree",), ("car",),
                   ("clutter", "background"))
VAIHINGEN_PROMPTS = (("impervious surface",), ("building",), ("low vegetation",), ("tree",), ("car",),
                     ("clutter",))
# ISPRS RGB label colours, in class order (the 2D labelling benchmark's legend)
ISPRS_COLOURS = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
ISAID_CLASSES = ("background", "ship", "store tank", "baseball diamond", "tennis court", "basketball court",
                 "ground track field", "bridge", "large vehicle", "small vehicle", "helicopter", "swimming pool",
                 "roundabout", "soccer ball field", "plane", "harbor")
# iSAID semantic-mask colours (RGB), in class order, as mmseg's converter reads them
ISAID_COLOURS = ((0, 0, 0), (0, 0, 63), (0, 63, 63), (0, 63, 0), (0, 63, 127), (0, 63, 191), (0, 63, 255),
                 (0, 127, 63), (0, 127, 127), (0, 0, 127), (0, 0, 191), (0, 0, 255), (0, 191, 127),
                 (0, 127, 191), (0, 127, 255), (0, 100, 155))


def _single(names: Sequence[str], strip_spaces: bool = False) -> tuple[tuple[str, ...], ...]:
    return tuple(((n.replace(" ", "") if strip_spaces else n),) for n in names)


def read_class_names(path: str | os.PathLike) -> tuple[tuple[str, ...], ...]:
    """A class-name file as the SCLIP family writes them: one line per class, synonyms
    separated by commas. Returns ``prompts[c]``, the names of class ``c``."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        names = tuple(n.strip() for n in line.split(",") if n.strip())
        rows.append(names)
    if not rows:
        raise ValueError(f"{path} has no class names")
    return tuple(rows)


# ---------------------------------------------------------------------------------- layout helpers
def _first_dir(root: Path, candidates: Sequence[str], what: str) -> Path:
    for c in candidates:
        p = root / c
        if p.is_dir():
            return p
    tried = ", ".join(str(root / c) for c in candidates)
    raise DatasetError(f"{what} not found; looked for {tried}")


def _find_root(root: Path, marker: str, prefixes: Sequence[str], what: str) -> Path:
    """The first of ``root/prefix`` that contains ``marker`` (so users may pass any parent)."""
    for prefix in prefixes:
        base = root / prefix if prefix else root
        if (base / marker).exists():
            return base
    tried = ", ".join(str((root / p if p else root) / marker) for p in prefixes)
    raise DatasetError(f"not a {what} root: none of {tried} exists")


def _read_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _pairs(image_dir: Path, label_dir: Path, image_exts: Sequence[str],
           label_name: Callable[[str], Sequence[str]], decode, what: str) -> list[Sample]:
    """Samples for every image in ``image_dir`` with its label ``label_dir/label_name(stem)``."""
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in image_exts)
    if not images:
        raise DatasetError(f"no {what} images ({', '.join(image_exts)}) in {image_dir}")
    samples = []
    for img in images:
        for candidate in label_name(img.stem):
            lab = label_dir / candidate
            if lab.is_file():
                break
        else:
            raise DatasetError(f"no label for {img.name} in {label_dir} (looked for {', '.join(label_name(img.stem))})")
        samples.append(Sample(img.stem, img, lab, decode))
    return samples


# ---------------------------------------------------------------------------------- readers
def _voc_reader(num_classes_reduce: bool):
    def read(root: Path) -> list[Sample]:
        base = _find_root(root, "ImageSets/Segmentation/val.txt", ("", "VOC2012", "VOCdevkit/VOC2012"),
                          "PASCAL VOC 2012 (devkit)")
        decode = _voc_decoder(21, _reduce_zero(20) if num_classes_reduce else _identity(21))
        return _listed_samples(base, "ImageSets/Segmentation/val.txt", "SegmentationClass", decode, "VOC")
    return read


def _listed_samples(base: Path, split: str, label_dir: str, decode, what: str) -> list[Sample]:
    """VOC-style samples: ids from ``split``, ``JPEGImages/<id>.jpg`` and ``<label_dir>/<id>.png``."""
    samples = []
    for name in _read_ids(base / split):
        img, lab = base / "JPEGImages" / f"{name}.jpg", base / label_dir / f"{name}.png"
        if not img.is_file() or not lab.is_file():
            raise DatasetError(f"{what} val image {name}: {img} or {lab} is missing")
        samples.append(Sample(name, img, lab, decode))
    return samples


def _context_reader(with_background: bool):
    def read(root: Path) -> list[Sample]:
        base = _find_root(root, "ImageSets/SegmentationContext/val.txt",
                          ("", "VOC2010", "VOCdevkit/VOC2010"), "PASCAL Context (mmseg layout)")
        decode = _identity(60) if with_background else _reduce_zero(59)
        return _listed_samples(base, "ImageSets/SegmentationContext/val.txt", "SegmentationClassContext", decode,
                               "Context")
    return read


def _ade_reader(root: Path) -> list[Sample]:
    base = _find_root(root, "images/validation", ("", "ADEChallengeData2016"), "ADE20K (ADEChallengeData2016)")
    # 0 = 'other' (not scored), 1..150 the classes
    return _pairs(base / "images/validation", base / "annotations/validation", (".jpg",),
                  lambda s: [f"{s}.png"], _reduce_zero(150), "ADE20K")


def _coco_base(root: Path) -> tuple[Path, Path]:
    base = _find_root(root, "annotations/val2017", ("", "coco_stuff164k", "cocostuff", "coco"),
                      "COCO-Stuff 164k")
    images = _first_dir(base, ("images/val2017", "val2017"), "COCO val2017 images")
    return images, base / "annotations/val2017"


def _coco_stuff_reader(root: Path) -> list[Sample]:
    image_dir, label_dir = _coco_base(root)
    raw = _apply_lut(_lut(_COCO_RAW_TO_171))  # raw stuffthingmaps: 0..181, 255 unlabeled
    train_ids = _identity(171)                # mmseg's converted *_labelTrainIds.png

    samples = []
    for s in _pairs(image_dir, label_dir, (".jpg",), lambda n: [f"{n}_labelTrainIds.png", f"{n}.png"],
                    None, "COCO val2017"):
        s.decode = train_ids if s.label_path.name.endswith("_labelTrainIds.png") else raw
        samples.append(s)
    return samples


def _coco_object_reader(root: Path) -> list[Sample]:
    image_dir, label_dir = _coco_base(root)
    # the GroupViT/TCL/NACLIP conversion: things -> 1..80, stuff and unlabeled -> 0 (background)
    from_instance = _identity(81)                                                  # *_instanceTrainIds.png
    from_train = _apply_lut(_lut({i: i + 1 for i in range(80)}, default=0))        # *_labelTrainIds.png
    from_raw = _apply_lut(_lut({r: i + 1 for r, i in _COCO_RAW_TO_171.items() if i < 80}, default=0))
    samples = []
    for s in _pairs(image_dir, label_dir, (".jpg",),
                    lambda n: [f"{n}_instanceTrainIds.png", f"{n}_labelTrainIds.png", f"{n}.png"],
                    None, "COCO val2017"):
        name = s.label_path.name
        s.decode = (from_instance if name.endswith("_instanceTrainIds.png")
                    else from_train if name.endswith("_labelTrainIds.png") else from_raw)
        samples.append(s)
    return samples


def _cityscapes_reader(root: Path) -> list[Sample]:
    base = _find_root(root, "leftImg8bit/val", ("", "cityscapes"), "Cityscapes")
    from_ids = _apply_lut(_lut(_CITYSCAPES_ID_TO_TRAIN))
    samples = []
    for city in sorted(p for p in (base / "leftImg8bit/val").iterdir() if p.is_dir()):
        for img in sorted(city.glob("*_leftImg8bit.png")):
            stem = img.name[: -len("_leftImg8bit.png")]
            gt = base / "gtFine/val" / city.name
            train, ids = gt / f"{stem}_gtFine_labelTrainIds.png", gt / f"{stem}_gtFine_labelIds.png"
            if train.is_file():
                samples.append(Sample(img.stem, img, train, _identity(19)))
            elif ids.is_file():
                samples.append(Sample(img.stem, img, ids, from_ids))
            else:
                raise DatasetError(f"no gtFine label for {img.name} ({train} or {ids})")
    if not samples:
        raise DatasetError(f"no *_leftImg8bit.png under {base / 'leftImg8bit/val'}")
    return samples


def _mmseg_pairs(root: Path, prefixes: Sequence[str], what: str, label_name, decode,
                 image_exts=(".png", ".jpg", ".tif")) -> list[Sample]:
    base = _find_root(root, "img_dir/val", prefixes, what)
    return _pairs(base / "img_dir/val", base / "ann_dir/val", image_exts, label_name, decode, what)


def _loveda_reader(root: Path) -> list[Sample]:
    decode = _reduce_zero(7)  # 0 = no-data (ignored), 1..7 the classes
    try:
        return _mmseg_pairs(root, ("", "LoveDA", "data/LoveDA", "loveDA"), "LoveDA (mmseg layout)",
                            lambda s: [f"{s}.png"], decode)
    except DatasetError as mmseg_err:
        # the official zip: Val/{Urban,Rural}/{images_png,masks_png}
        try:
            base = _find_root(root, "Val", ("", "LoveDA"), "LoveDA (official layout)")
        except DatasetError:
            raise DatasetError(f"{mmseg_err}; nor the official layout Val/{{Urban,Rural}}/images_png") from None
        samples, seen = [], set()
        for domain in ("Urban", "Rural"):
            d = base / "Val" / domain
            if not d.is_dir():
                continue
            for s in _pairs(d / "images_png", d / "masks_png", (".png",), lambda n: [f"{n}.png"], decode, "LoveDA"):
                if s.name in seen:  # Urban and Rural number their tiles apart; keep names unique anyway
                    s.name = f"{domain}_{s.name}"
                seen.add(s.name)
                samples.append(s)
        if not samples:
            raise DatasetError(f"no LoveDA tiles under {base / 'Val'}")
        return samples


def _isprs_reader(prefixes: Sequence[str], what: str):
    # mmseg's converter writes 0 = boundary/undefined, 1..6 the classes (reduce_zero_label);
    # RGB-coded labels (the benchmark's own colours) are decoded too, other colours ignored.
    decode = _rgb_decoder(ISPRS_COLOURS, range(6), IGNORE, _reduce_zero(6))

    def read(root: Path) -> list[Sample]:
        return _mmseg_pairs(root, prefixes, f"{what} (mmseg layout)", lambda s: [f"{s}.png", f"{s}.tif"], decode)
    return read


def _isaid_reader(root: Path) -> list[Sample]:
    # mmseg's converter keeps the '_instance_color_RGB' suffix but writes class indices;
    # raw RGB semantic masks are decoded by colour (unknown colours -> background, as the converter)
    decode = _rgb_decoder(ISAID_COLOURS, range(16), 0, _identity(16))
    return _mmseg_pairs(root, ("", "iSAID", "data/iSAID"), "iSAID (mmseg layout)",
                        lambda s: [f"{s}_instance_color_RGB.png", f"{s}.png"], decode, image_exts=(".png",))


# ---------------------------------------------------------------------------------- OpenImages V7
def _find_file(root: Path, patterns: Sequence[str], what: str) -> Path:
    for pattern in patterns:
        hits = sorted(root.glob(pattern)) + sorted(root.glob(f"*/{pattern}"))
        if hits:
            return hits[0]
    raise DatasetError(f"{what} not found under {root} (looked for {', '.join(patterns)})")


def _read_class_descriptions(path: Path) -> list[tuple[str, str]]:
    """``[(MID, display name)]`` in file order; the header row is optional (boxable file has none)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if len(row) < 2 or (not rows and row[0] == "LabelName"):
                continue
            rows.append((row[0], row[1]))
    return rows


class OpenImagesV7:
    """OpenImages V7 point labels: classes from the class descriptions, points from the CSV.

    Expected files (the official download, any of these under the root or one folder down):
    ``oidv7-val-annotations-point-labels.csv`` (columns ImageId, X, Y, Label, EstimatedYesNo,
    ...), ``oidv7-class-descriptions.csv`` (LabelName, DisplayName), and the images as
    ``validation/<ImageId>.jpg`` (also ``validation/data/`` or ``images/validation/``).
    'unsure' points are dropped; X and Y are relative coordinates in ``[0, 1]``.
    """

    def __init__(self, root: Path):
        self.root = root
        points_csv = _find_file(root, ("oidv7-val-annotations-point-labels.csv", "*val*point-labels*.csv"),
                                "OpenImages V7 validation point labels")
        desc_csv = _find_file(root, ("oidv7-class-descriptions.csv", "*class-descriptions*.csv"),
                              "OpenImages class descriptions")
        self.image_dir = _first_dir(root, ("validation", "validation/data", "images/validation", "val"),
                                    "OpenImages validation images")
        mids = _read_class_descriptions(desc_csv)
        self.mids = [m for m, _ in mids]
        self.names = [n for _, n in mids]
        self.index = {m: i for i, m in enumerate(self.mids)}
        self.points_csv = points_csv

    def samples(self) -> list[Sample]:
        per_image: dict[str, list[tuple[float, float, int, bool]]] = {}
        with open(self.points_csv, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            need = {"ImageId", "X", "Y", "Label", "EstimatedYesNo"}
            if not need <= set(reader.fieldnames or ()):
                raise DatasetError(f"{self.points_csv} lacks columns {sorted(need - set(reader.fieldnames or ()))}")
            for row in reader:
                answer = row["EstimatedYesNo"].strip().lower()
                if answer not in ("yes", "no"):
                    continue  # 'unsure' points are not scored
                mid = row["Label"]
                if mid not in self.index:  # a class without a description: its MID is its name
                    self.index[mid] = len(self.mids)
                    self.mids.append(mid)
                    self.names.append(mid)
                per_image.setdefault(row["ImageId"], []).append(
                    (float(row["X"]), float(row["Y"]), self.index[mid], answer == "yes"))
        samples = []
        for image_id in sorted(per_image):
            img = self.image_dir / f"{image_id}.jpg"
            if not img.is_file():
                continue  # point files cover images a partial download may lack
            pts = per_image[image_id]
            samples.append(Sample(image_id, img, points=Points(
                x=np.array([p[0] for p in pts], dtype=np.float64), y=np.array([p[1] for p in pts], dtype=np.float64),
                cls=np.array([p[2] for p in pts], dtype=np.int64), positive=np.array([p[3] for p in pts], dtype=bool))))
        if not samples:
            raise DatasetError(f"none of the images named in {self.points_csv} is in {self.image_dir}")
        return samples


# ---------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark: its classes, text prompts, background class and reader.

    Attributes:
        name: the ``--dataset`` name.
        title: human name for tables.
        classes: ``C`` class names, index = label value after decoding.
        prompts: per class, the names whose text embeddings compete for it.
        background: class that pixels under the probability threshold fall back to (None if
            the dataset has no such class: then no threshold can be used).
        reader: ``root -> list[Sample]``; None for OpenImages (classes come from its files).
        kind: ``"semantic"`` (label maps) or ``"points"`` (OpenImages V7).
    """

    name: str
    title: str
    classes: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]
    background: int | None
    reader: Callable[[Path], list[Sample]] | None
    kind: str = "semantic"

    def __post_init__(self):
        if len(self.prompts) != len(self.classes):
            raise ValueError(f"{self.name}: {len(self.prompts)} prompt sets for {len(self.classes)} classes")

    def samples(self, root: str | os.PathLike) -> list[Sample]:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"dataset root {root} is not a folder")
        if self.reader is None:
            raise ValueError(f"{self.name} is read with OpenImagesV7")
        return self.reader(root)


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("voc21", "PASCAL VOC 2012 val (21 classes, with background)", VOC_CLASSES, VOC21_PROMPTS, 0,
                _voc_reader(False)),
    DatasetSpec("voc20", "PASCAL VOC 2012 val (20 classes, background ignored)", VOC_CLASSES[1:], VOC20_PROMPTS,
                None, _voc_reader(True)),
    DatasetSpec("context60", "PASCAL Context val (60 classes, with background)", CONTEXT60_CLASSES,
                _single(CONTEXT60_CLASSES), 0, _context_reader(True)),
    DatasetSpec("context59", "PASCAL Context val (59 classes, background ignored)", CONTEXT59_CLASSES,
                _single(CONTEXT59_CLASSES), None, _context_reader(False)),
    DatasetSpec("ade20k", "ADE20K val (150 classes)", ADE20K_CLASSES, _single(ADE20K_CLASSES, True), None,
                _ade_reader),
    DatasetSpec("coco-stuff", "COCO-Stuff 164k val (171 classes)", COCO_STUFF_CLASSES,
                _single(COCO_STUFF_CLASSES, True), None, _coco_stuff_reader),
    DatasetSpec("coco-object", "COCO-Object val (80 things + background)", COCO_OBJECT_CLASSES,
                COCO_OBJECT_PROMPTS, 0, _coco_object_reader),
    DatasetSpec("cityscapes", "Cityscapes val (19 classes)", CITYSCAPES_CLASSES,
                _single(CITYSCAPES_CLASSES, True), None, _cityscapes_reader),
    DatasetSpec("loveda", "LoveDA val (7 classes)", LOVEDA_CLASSES, LOVEDA_PROMPTS, 0, _loveda_reader),
    DatasetSpec("potsdam", "ISPRS Potsdam val (6 classes)", ISPRS_CLASSES, POTSDAM_PROMPTS, 5,
                _isprs_reader(("", "potsdam", "data/potsdam"), "Potsdam")),
    DatasetSpec("vaihingen", "ISPRS Vaihingen val (6 classes)", ISPRS_CLASSES, VAIHINGEN_PROMPTS, 5,
                _isprs_reader(("", "vaihingen", "data/vaihingen"), "Vaihingen")),
    DatasetSpec("isaid", "iSAID val (15 classes + background)", ISAID_CLASSES, _single(ISAID_CLASSES), 0,
                _isaid_reader),
    DatasetSpec("openimages-v7", "OpenImages V7 val point labels (point-wise mIoU)", (), (), None, None,
                kind="points"),
)}


def dataset_names() -> list[str]:
    return list(DATASETS)


def get_dataset(name: str) -> DatasetSpec:
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None

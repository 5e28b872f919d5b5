"""Visual prototypes of a project's labels, learnt from its annotations without training.

GEM's patch tokens inside a mask that an annotator accepted are examples of what that label
looks like *in this project*. Their mean direction is the label's **prototype**; blending it
with the label's text embedding sharpens later predictions of the same project
(:func:`gem_backend.segmentation.blend_prototypes`).

From an annotation to a contribution (:func:`contribution_from_masks`):

1. each annotated region is decoded to a mask (:func:`gem_backend.labelstudio.annotations.result_masks`):
   brush RLE (alpha >= 128), polygons (points in percent of the image) filled by pixel centre (even-odd),
   bitmask PNGs (alpha > 0); boxes are not learnt from; regions of one label are OR-ed;
2. the mask is reduced to the image's token grid as the **area fraction** of every patch
   (:func:`grid_fractions`, an exact box average); a patch belongs to the label when at least
   :data:`INSIDE` (half) of it is inside; when no patch is, the single patch with the largest
   fraction stands for the region (small objects still count);
3. per label, the **sum** of the L2-normalised GEM patch tokens of its patches and their number;
   the patches entirely outside every annotated region (fraction 0) are summed the same way under
   :data:`~gem_backend.segmentation.BACKGROUND_KEY`: in a segmentation project, what annotators
   leave unpainted is background.

Sums are kept as **fixed-point int64** (:data:`FIXED_POINT` = 2^24 per unit), so adding and
subtracting contributions is exact: deleting every annotation gives back exactly zero, and an
update that replaces a contribution leaves exactly what the new one adds.

Per project, the :class:`PrototypeStore` keeps each annotation's contribution keyed by its id
(with Label Studio's ``updated_at``, so a late, older copy of an event cannot overwrite a newer
one) and per label the running totals: annotations holding the label ``n``, patches, and the
sum. ``put`` replaces an annotation's contribution (totals minus the old plus the new);
``remove`` subtracts it and leaves a tombstone, so a ``CREATED`` event handled after the
``DELETED`` one (two workers) does not bring it back. Prototype of a label = ``sum / |sum|``.

The blend weight of a label (:func:`blend_weight`)::

    a = s * n / (n + n_min)     when n >= n_min, else 0 (text only)

with ``s`` = ``prototype_strength`` and ``n_min`` = ``prototype_min_annotations``: half the
strength when the label has just enough annotations, approaching ``s`` as they accumulate.

Stores: :class:`RedisPrototypeStore` with ``REDIS_URL`` (shared by every worker and replica),
else :class:`FilePrototypeStore` under ``GEM_STATE_DIR`` (JSON files and a file lock, shared by
the workers of one machine). Keys are per project and per model feature space (model, weights,
GEM settings), so projects never mix and another model never reads these vectors.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from PIL import Image

from ..labelstudio.annotations import AnnotationError, result_masks
from ..algorithm.segmentation import BACKGROUND_KEY, ImageEmbedding, SegmentationSettings

log = logging.getLogger(__name__)

__all__ = ["BACKGROUND_KEY", "FIXED_POINT", "INSIDE", "AnnotationError", "LabelSum", "Contribution", "LabelTotal",
           "OUTSIDE", "grid_fractions", "contribution_from_masks", "result_masks", "blend_weight", "active_prototypes",
           "prototype_digest", "apply_contribution", "PrototypeStore", "FilePrototypeStore", "RedisPrototypeStore",
           "MemoryPrototypeStore", "open_store", "feature_namespace", "contribution_for_annotation"]

FIXED_POINT = 1 << 24   # fixed-point scale of stored sums: exact integer add/subtract
INSIDE = 0.5            # a patch belongs to a region when at least this fraction of it is inside
# boxes are too coarse to learn a label's look from
LEARN_KINDS = ("brushlabels", "polygonlabels", "bitmasklabels")
OUTSIDE = 1e-6          # ... and to the background when at most this fraction is inside any region


# ----------------------------------------------------------------------------------- arithmetic
@dataclass
class LabelSum:
    """One label's part of one annotation: ``patches`` tokens summed into ``sum`` (int64 ``[D]``,
    fixed point)."""

    patches: int
    sum: np.ndarray

    def to_json(self) -> dict:
        return {"n": int(self.patches), "s": _b64(self.sum)}

    @classmethod
    def from_json(cls, data: Mapping) -> "LabelSum":
        return cls(int(data["n"]), _unb64(data["s"]))


@dataclass
class Contribution:
    """What one annotation adds to its project's prototypes: per label a :class:`LabelSum`
    (each label counts the annotation once). ``task`` and ``stamp`` (Label Studio's
    ``updated_at``) are bookkeeping."""

    labels: dict[str, LabelSum] = field(default_factory=dict)
    task: Any = None
    stamp: str = ""

    def add(self, other: "Contribution") -> None:
        for label, part in other.labels.items():
            mine = self.labels.get(label)
            self.labels[label] = part if mine is None else LabelSum(mine.patches + part.patches, mine.sum + part.sum)

    def to_json(self) -> dict:
        return {"task": self.task, "stamp": self.stamp,
                "labels": {label: part.to_json() for label, part in sorted(self.labels.items())}}

    @classmethod
    def from_json(cls, data: Mapping) -> "Contribution":
        return cls({str(k): LabelSum.from_json(v) for k, v in (data.get("labels") or {}).items()},
                   data.get("task"), str(data.get("stamp") or ""))


@dataclass
class LabelTotal:
    """Running totals of one label in one project: ``annotations`` holding it, ``patches``, and
    the fixed-point ``sum`` of their tokens."""

    annotations: int
    patches: int
    sum: np.ndarray

    def prototype(self) -> np.ndarray | None:
        """``[D]`` float32 unit vector (the normalised mean token), None when the sum is 0."""
        vec = self.sum.astype(np.float64)
        norm = float(np.linalg.norm(vec))
        return None if norm <= 0.0 else (vec / norm).astype(np.float32)

    def to_json(self) -> dict:
        return {"a": int(self.annotations), "n": int(self.patches), "s": _b64(self.sum)}

    @classmethod
    def from_json(cls, data: Mapping) -> "LabelTotal":
        return cls(int(data["a"]), int(data["n"]), _unb64(data["s"]))


def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype="<i8").tobytes()).decode("ascii")


def _unb64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<i8").astype(np.int64)


def apply_contribution(totals: Mapping[str, LabelTotal], old: Contribution | None,
                       new: Contribution | None) -> dict[str, LabelTotal]:
    """``totals - old + new``, exactly (integers); labels left with no annotation are dropped."""
    out = {k: LabelTotal(v.annotations, v.patches, v.sum.copy()) for k, v in totals.items()}
    for contribution, sign in ((old, -1), (new, 1)):
        if contribution is None:
            continue
        for label, part in contribution.labels.items():
            cur = out.get(label)
            if cur is None:
                cur = out[label] = LabelTotal(0, 0, np.zeros_like(part.sum))
            if cur.sum.shape != part.sum.shape:
                raise ValueError(f"label {label!r}: contribution of dimension {part.sum.shape[0]} "
                                 f"on totals of dimension {cur.sum.shape[0]}")
            cur.annotations += sign
            cur.patches += sign * part.patches
            cur.sum += sign * part.sum
    for label in [k for k, v in out.items() if v.annotations <= 0]:
        if out[label].annotations < 0 or out[label].patches != 0 or out[label].sum.any():
            log.warning("prototypes: label %r went below zero annotations; reset", label)
        del out[label]
    return out


# ----------------------------------------------------------------------------------- masks -> sums
def grid_fractions(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``[h, w]`` float32: the fraction of each token-grid cell covered by ``mask`` (``[H, W]``,
    any size and aspect; cells are the image split evenly into ``h x w``), an exact box
    average."""
    h, w = int(grid[0]), int(grid[1])
    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0:
        raise AnnotationError(f"mask must be a non-empty 2-D array, got shape {m.shape}")
    img = Image.fromarray(m.astype(np.float32), mode="F")
    return np.clip(np.asarray(img.resize((w, h), Image.Resampling.BOX), dtype=np.float32), 0.0, 1.0)


def _fixed(vec: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = vec.detach().double().cpu().numpy() if isinstance(vec, torch.Tensor) else np.asarray(vec, np.float64)
    return np.rint(arr * FIXED_POINT).astype(np.int64)


def _patches(embedding: ImageEmbedding) -> torch.Tensor:
    # one token per grid cell (through windows: the windows' tokens averaged per cell)
    p = embedding.grid_tokens() if getattr(embedding, "windows", None) is not None else embedding.patches
    return p if isinstance(p, torch.Tensor) else torch.from_numpy(np.asarray(p))


def contribution_from_masks(embedding: ImageEmbedding, masks: Mapping[str, np.ndarray],
                            background: bool = True) -> Contribution:
    """Per label the sum of the patch tokens inside its mask (see the module doc); with
    ``background``, the patches outside every mask under :data:`BACKGROUND_KEY`.

    Args:
        embedding: the image's features (one L2-normalised token per grid cell: ``patches``
            ``[h*w, D]``, or through windows ``grid_tokens()``).
        masks: ``{label: [H, W] bool}`` (any resolution; only the aspect must be the image's).
    """
    tokens = _patches(embedding).float()
    h, w = embedding.grid
    out = Contribution()
    covered = np.zeros(h * w, np.float32)
    for label, mask in masks.items():
        frac = grid_fractions(mask, (h, w)).ravel()
        if not frac.any():
            continue
        covered = np.maximum(covered, frac)
        sel = frac >= INSIDE
        if not sel.any():
            sel = frac == frac.max()
            sel[np.flatnonzero(sel)[1:]] = False  # one patch: the first with the largest fraction
        idx = torch.from_numpy(np.flatnonzero(sel))
        out.labels[label] = LabelSum(int(idx.numel()), _fixed(tokens[idx].double().sum(dim=0)))
    if background and out.labels:
        idx = torch.from_numpy(np.flatnonzero(covered <= OUTSIDE))
        if idx.numel():
            out.labels[BACKGROUND_KEY] = LabelSum(int(idx.numel()), _fixed(tokens[idx].double().sum(dim=0)))
    return out


# ----------------------------------------------------------------------------------- use
def blend_weight(annotations: int, strength: float, min_annotations: int) -> float:
    """``a = s * n / (n + n_min)`` for ``n >= n_min`` annotations, else 0 (see the module doc)."""
    if annotations < max(1, min_annotations) or strength <= 0.0:
        return 0.0
    return float(strength) * annotations / (annotations + max(1, min_annotations))


def active_prototypes(totals: Mapping[str, LabelTotal], seg: SegmentationSettings,
                      labels: Iterable[str] | None = None) -> dict[str, tuple[np.ndarray, float]]:
    """``{label: (prototype, a)}`` for the labels (of ``labels``, and the background) whose
    weight is above 0."""
    wanted = None if labels is None else set(labels) | {BACKGROUND_KEY}
    out = {}
    for label, total in totals.items():
        if wanted is not None and label not in wanted:
            continue
        a = blend_weight(total.annotations, seg.prototype_strength, seg.prototype_min_annotations)
        vec = total.prototype() if a > 0 else None
        if vec is not None:
            out[label] = (vec, a)
    return out


def prototype_digest(totals: Mapping[str, LabelTotal], active: Iterable[str]) -> str:
    """Six hex digits naming the coarse state of the active prototypes: per label the power of
    two its annotation count has reached (1, 2-3, 4-7, 8-15, ...), so the digest, and with it
    the model version, changes when a label starts being used and each time its count doubles,
    not on every annotation. ``""`` when none is active."""
    state = sorted((label, int(totals[label].annotations).bit_length()) for label in active if label in totals)
    if not state:
        return ""
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:6]


def feature_namespace(settings) -> str:
    """The feature space prototypes live in: model, weights and GEM settings (short hash)."""
    key = json.dumps([settings.model, settings.weights_id, settings.depth, settings.ss_attn_iter,
                      settings.ss_attn_temp])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------- stores
def project_key(project: Any) -> str:
    pid = str(project).split(".", 1)[0].strip() if project not in (None, "") else ""
    if not pid or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", pid):
        raise ValueError(f"bad project id {project!r}")
    return pid


def annotation_key(annotation_id: Any) -> str:
    aid = str(annotation_id).strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", aid):
        raise ValueError(f"bad annotation id {annotation_id!r}")
    return aid


class PrototypeStore:
    """Per-project contributions and totals; see the module doc. Subclasses implement
    :meth:`_update` (an atomic read-modify-write of one project's state) and the reads."""

    def put(self, project: Any, annotation_id: Any, contribution: Contribution) -> bool:
        """Replace the annotation's contribution. False (nothing changes) when the annotation
        was deleted, or the stored copy is newer (``stamp``)."""
        pid, aid = project_key(project), annotation_key(annotation_id)

        def change(state: _State) -> bool:
            if aid in state.deleted:
                return False
            old = state.get(aid)
            if old is not None and contribution.stamp and old.stamp and old.stamp > contribution.stamp:
                return False
            state.totals = apply_contribution(state.totals, old, contribution)
            state.set(aid, contribution)
            return True

        return self._update(pid, change)

    def remove(self, project: Any, annotation_ids: Iterable[Any]) -> int:
        """Subtract the annotations' contributions and remember them as deleted; returns how many
        were stored."""
        pid = project_key(project)
        ids = [annotation_key(a) for a in annotation_ids]

        def change(state: _State) -> int:
            removed = 0
            for aid in ids:
                old = state.get(aid)
                if old is not None:
                    state.totals = apply_contribution(state.totals, old, None)
                    state.drop(aid)
                    removed += 1
                state.deleted.add(aid)
            return removed

        return self._update(pid, change)

    def totals(self, project: Any) -> dict[str, LabelTotal]:
        """``{label: LabelTotal}`` of the project (:data:`BACKGROUND_KEY` included)."""
        raise NotImplementedError

    def annotation_ids(self, project: Any) -> set[str]:
        """Ids of the annotations whose contributions are stored."""
        raise NotImplementedError

    def contribution(self, project: Any, annotation_id: Any) -> Contribution | None:
        raise NotImplementedError

    def _update(self, pid: str, change: Callable[["_State"], Any]) -> Any:
        raise NotImplementedError


class _State:
    """One project's state inside an update: totals, deleted ids, and lazily read / staged
    contributions."""

    def __init__(self, totals: dict[str, LabelTotal], deleted: set[str], reader: Callable[[str], Any]):
        self.totals = totals
        self.deleted = set(deleted)
        self._reader = reader
        self.changed: dict[str, Contribution | None] = {}

    def get(self, aid: str) -> Contribution | None:
        if aid in self.changed:
            return self.changed[aid]
        return self._reader(aid)

    def set(self, aid: str, contribution: Contribution) -> None:
        self.changed[aid] = contribution

    def drop(self, aid: str) -> None:
        self.changed[aid] = None


def _totals_json(totals: Mapping[str, LabelTotal]) -> str:
    return json.dumps({k: v.to_json() for k, v in sorted(totals.items())})


def _totals_from(raw: Any) -> dict[str, LabelTotal]:
    if not raw:
        return {}
    return {str(k): LabelTotal.from_json(v) for k, v in json.loads(raw).items()}


def _copy(totals: Mapping[str, LabelTotal]) -> dict[str, LabelTotal]:
    return {k: LabelTotal(v.annotations, v.patches, v.sum.copy()) for k, v in totals.items()}


class MemoryPrototypeStore(PrototypeStore):
    """In one process only (tests, the evaluation loop)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._projects: dict[str, dict] = {}

    def _project(self, pid: str) -> dict:
        return self._projects.setdefault(pid, {"totals": {}, "ann": {}, "deleted": set()})

    def _update(self, pid, change):
        with self._lock:
            p = self._project(pid)
            state = _State(_copy(p["totals"]), p["deleted"], p["ann"].get)
            result = change(state)
            p["totals"], p["deleted"] = state.totals, state.deleted
            for aid, c in state.changed.items():
                if c is None:
                    p["ann"].pop(aid, None)
                else:
                    p["ann"][aid] = c
            return result

    def totals(self, project):
        with self._lock:
            return _copy(self._project(project_key(project))["totals"])

    def annotation_ids(self, project):
        with self._lock:
            return set(self._project(project_key(project))["ann"])

    def contribution(self, project, annotation_id):
        with self._lock:
            return self._project(project_key(project))["ann"].get(annotation_key(annotation_id))


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


class FilePrototypeStore(PrototypeStore):
    """JSON files under ``root/prototypes/<namespace>/<project>/``: ``totals.json``,
    ``deleted.json`` and ``ann/<annotation id>.json``; writes are atomic (temp file + rename)
    and every update holds an exclusive ``flock`` on the project's ``.lock``, so the workers of
    one machine agree."""

    def __init__(self, root: str | os.PathLike, namespace: str):
        self.root = Path(root) / "prototypes" / namespace

    def _dir(self, pid: str) -> Path:
        return self.root / pid

    @staticmethod
    def _write(path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    @staticmethod
    def _read_contribution(d: Path, aid: str) -> Contribution | None:
        raw = _read_text(d / "ann" / f"{aid}.json")
        return Contribution.from_json(json.loads(raw)) if raw else None

    def _update(self, pid, change):
        import fcntl

        d = self._dir(pid)
        (d / "ann").mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                deleted = set(json.loads(_read_text(d / "deleted.json") or "[]"))
                state = _State(_totals_from(_read_text(d / "totals.json")), deleted,
                               lambda aid: self._read_contribution(d, aid))
                result = change(state)
                for aid, c in state.changed.items():
                    path = d / "ann" / f"{aid}.json"
                    if c is None:
                        path.unlink(missing_ok=True)
                    else:
                        self._write(path, json.dumps(c.to_json()))
                if state.deleted != deleted:
                    self._write(d / "deleted.json", json.dumps(sorted(state.deleted)))
                self._write(d / "totals.json", _totals_json(state.totals))
                return result
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def totals(self, project):
        return _totals_from(_read_text(self._dir(project_key(project)) / "totals.json"))

    def annotation_ids(self, project):
        d = self._dir(project_key(project)) / "ann"
        return {p.stem for p in d.glob("*.json")} if d.is_dir() else set()

    def contribution(self, project, annotation_id):
        return self._read_contribution(self._dir(project_key(project)), annotation_key(annotation_id))


class RedisPrototypeStore(PrototypeStore):
    """Redis keys ``gem:proto:<namespace>:<project>:`` + ``tot`` (JSON totals), ``ann`` (hash:
    annotation id -> JSON contribution) and ``del`` (set of deleted ids); updates are
    optimistic transactions (``WATCH``/``MULTI``, retried on a conflict)."""

    def __init__(self, url_or_client: Any, namespace: str, timeout: float = 2.0):
        if isinstance(url_or_client, str):
            import redis

            self.redis = redis.Redis.from_url(url_or_client, socket_timeout=timeout, socket_connect_timeout=timeout)
        else:
            self.redis = url_or_client
        self.prefix = f"gem:proto:{namespace}:"

    def _keys(self, pid: str) -> tuple[str, str, str]:
        base = self.prefix + pid + ":"
        return base + "tot", base + "ann", base + "del"

    def _update(self, pid, change):
        import redis

        tot, ann, dele = self._keys(pid)
        for _ in range(100):
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(tot, ann, dele)
                    deleted = {_text(m) for m in pipe.smembers(dele)}

                    def read(aid, pipe=pipe):
                        raw = pipe.hget(ann, aid)
                        return None if raw is None else Contribution.from_json(json.loads(raw))

                    state = _State(_totals_from(pipe.get(tot)), deleted, read)
                    result = change(state)
                    pipe.multi()
                    for aid, c in state.changed.items():
                        if c is None:
                            pipe.hdel(ann, aid)
                        else:
                            pipe.hset(ann, aid, json.dumps(c.to_json()))
                    new_deleted = state.deleted - deleted
                    if new_deleted:
                        pipe.sadd(dele, *sorted(new_deleted))
                    pipe.set(tot, _totals_json(state.totals))
                    pipe.execute()
                    return result
                except redis.WatchError:
                    time.sleep(0.001)
                    continue
        raise RuntimeError(f"prototypes of project {pid}: too many concurrent updates")

    def totals(self, project):
        return _totals_from(self.redis.get(self._keys(project_key(project))[0]))

    def annotation_ids(self, project):
        return {_text(k) for k in self.redis.hkeys(self._keys(project_key(project))[1])}

    def contribution(self, project, annotation_id):
        raw = self.redis.hget(self._keys(project_key(project))[1], annotation_key(annotation_id))
        return None if raw is None else Contribution.from_json(json.loads(raw))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_store(settings) -> PrototypeStore:
    """Redis with ``REDIS_URL``, else files under ``GEM_STATE_DIR``, in the model's namespace."""
    ns = feature_namespace(settings)
    if settings.redis_url:
        return RedisPrototypeStore(settings.redis_url, ns)
    return FilePrototypeStore(settings.state_dir, ns)


# ----------------------------------------------------------------------------------- annotations
def contribution_for_annotation(service, spec, task: Mapping, annotation: Mapping) -> tuple[Contribution, list[str]]:
    """One Label Studio annotation -> its :class:`Contribution`, and the problems of results that
    were skipped (one line each).

    The GEM features of each annotated image come from ``service.image_embedding`` (the image
    cache: a task already predicted costs no forward pass). Results on images the config does
    not know are skipped.

    Raises:
        AnnotationError: the annotation or task is malformed (no result list, no task data).
        ImageError, OSError: the image cannot be fetched or decoded.
    """
    results = annotation.get("result")
    if results is None:
        results = []
    if not isinstance(results, list):
        raise AnnotationError("annotation 'result' is not a list")
    stamp = annotation.get("updated_at") or annotation.get("created_at") or ""
    out = Contribution(task=task.get("id"), stamp=str(stamp))
    if annotation.get("was_cancelled"):
        return out, []  # a skipped task holds no annotation to learn from
    data = task.get("data")
    if not isinstance(data, Mapping):
        raise AnnotationError(f"task {task.get('id')} has no data object")
    images = {}
    for target in spec.targets:
        images.setdefault(target.to_name, target.value_key)
    problems: list[str] = []
    seg = spec.segmentation
    predictor = None
    names = sorted({r.get("to_name") for r in results if isinstance(r, Mapping)
                    and r.get("type") in LEARN_KINDS}, key=str)
    for to_name in names:
        key = images.get(to_name)
        url = data.get(key) if key else None
        if not isinstance(url, str) or not url:
            problems.append(f"results on {to_name!r}: no image of the label config under that name")
            continue
        if predictor is None:
            predictor = service.predictor(seg)
        embedding = service.image_embedding(predictor, url, task.get("id"), seg)
        masks, bad = result_masks(results, to_name, tuple(embedding.original_size), kinds=LEARN_KINDS)
        problems.extend(bad)
        out.add(contribution_from_masks(embedding, masks))
    return out, problems


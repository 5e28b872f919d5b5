"""The SC-CLIP family: SC-CLIP (``scclip``) and SFP (``sfp``), self-calibrated last blocks.

Both reproduce the official code (``shared/golden/scclip-reference``, its README is the
specification; 1e-4 in float32 on CPU, checked by ``tests/test_scclip.py``). With ``F_i``
the residual stream after vision block ``i`` of the unmodified tower (``i = 1 .. L-1``,
``[1+N, width]``, CLS first), ``P = F_{L-1}[1:]``, ``cut(S) = S where S >= 0.4 else 0``,
``aggregate(X, T) = (T / (T.sum(-1) + 1e-6)) @ X`` and ``posmix(S)`` a row softmax of
``3 (S - mean(S))`` with its negative entries masked (:func:`posmix`), per image:

``scclip`` (SC-CLIP, Bai et al.): options ``pre_adjust_idx`` (8), ``post_adjust_idx`` (3),
``multi_start_idx`` (3), ``multi_end_idx`` (10), ``res_cls`` (0.3).

1. outliers: the LOF anomalies of ``P`` (:func:`lof_outliers`, the official variant);
2. each outlier of ``P`` and of ``F_{pre+1}[1:]`` becomes the mean of its non-outlier
   grid neighbours (:func:`mean_interpolation`) -> ``P'``, ``Q'``;
3. ``S_pre = cos(Q')``, ``S_post = cos(F_{post+1}[1:])``;
4. main: ``X = aggregate(P', cut(S_pre))``, last block's attention on ``ln_1(X)`` with
   ``A = (posmix(S_pre) + softmax(s k k^T)) / 2`` and no residual or FFN,
   ``main = aggregate(out_proj(A v) + res_cls * F_{L-1}[0], cut(S_post))``;
5. multi: the same on ``R = F_{ms+1} + ... + F_{me}``: ``y = ln_1(R[1:])``,
   ``multi = aggregate(out_proj(A' v') + res_cls * R[0], cut(S_post))``;
6. patch tokens ``ln_post(main + multi) @ proj``.

``sfp`` (SFP, ICCV 2025): options ``pm`` (``"SOM"``, ``"L2"``, ``"LOF"``) and ``res_cls``
(0.3). The same frame with fixed indices (``F_9``, ``F_4``, ``F_4 .. F_10``; needs a tower of
at least 11 blocks), outliers by ``pm`` (:func:`som_outliers`: patches the CLS attends to
more than to themselves in block ``L-1``, CLS row scaled by ``5 res_cls``;
:func:`l2_outliers`; or LOF), both S matrices thresholded everywhere (``posmix(cut(S_pre))``),
``A = (softmax(s k k^T) + softmax(s q q^T) + posmix(cut(S_pre))) / 3`` in the main branch
and ``A' = posmix(cut(S_pre))`` alone in the multi-level branch.

Where this differs from the official code (which runs one square window at a time):

- Grid positions are row-major ``(i // w, i % w)``. The official ``(i // h, i % h)``
  equals it on square grids, the only ones its protocol produces; on non-square grids
  (whole images in serving) it would mislocate outliers, so the correct positions are used.
- SFP replaces an outlier without a valid neighbour by the zero vector, which makes every
  token NaN; here it keeps its vector, as in SC-CLIP (no golden case has one).
- Grids too small for the fixed constants: LOF uses ``min(30, N - 1)`` neighbours, SOM/L2
  ``min(10, N)`` outliers; no outlier at all is a no-op (the official code fails).
- Row 0 of :meth:`encode_image` (the official returns no CLS) is ``ln_post(F_{L-1}[0]) @ proj``,
  the projected CLS of the last block's input.
- Images of a batch are computed independently (the official code is batch-of-one).

Precision: the outlier detection, the similarity matrices, their thresholds, ``posmix``,
the attention matrices and the aggregations run in float32 whatever the model's dtype;
the model's own modules (blocks, ``ln_1``, projections, ``ln_post``) run in its dtype.

Shapes: ``B`` images, grid ``h x w``, ``N = h * w`` patches, ``width`` the tower's width,
``heads`` attention heads of width ``d``, ``D`` the joint embedding size, ``K`` outliers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dense import DenseCLIP, MethodError, interpolate_pos_encoding

__all__ = ["SCCLIP", "SFP", "SelfCalibratedCLIP", "knn_sq_distances", "lof_scores", "lof_outliers",
           "som_scores", "som_outliers", "l2_outliers", "mean_interpolation", "cosine_matrix", "cut",
           "aggregate", "posmix", "mixed_attention"]

LOF_NEIGHBOURS = 30
LOF_QUANTILE = 0.95  # contamination 0.05
TOP_OUTLIERS = 10  # SFP's SOM and L2 detectors
SIM_THRESHOLD = 0.4
POSMIX_TEMPERATURE = 3.0
CHUNK_BYTES = 128 * 2 ** 20  # bound of one block of token differences in knn_sq_distances


# ---------------------------------------------------------------------- outlier detection
def knn_sq_distances(x: torch.Tensor, k: int, chunk_bytes: int = CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest other rows of every row, by squared Euclidean distance.

    The official code takes the distances from the float32 differences
    (``||x_i - x_j||^2``): the float32 matrix-product form (``cdist``) is off by ~5e-5 and
    flips near-tied neighbours. Here the product form runs in **float64**
    (``|x_i|^2 + |x_j|^2 - 2 x_i.x_j``): its error (~1e-12 relative) is far below the
    float32 rounding of the difference form itself, so the neighbour sets and k-distances
    are the official ones, at GEMM speed instead of ``N^2 * width`` element operations
    (N = 1568 tokens of width 768, one thread: 5.1 s -> 0.13 s, ``benchmarks/methods_cost.py --rows knn``). Rows go ``c`` at a time,
    ``[c, N]`` float64 within ``chunk_bytes``.

    Args:
        x: ``[N, width]``.
        k: neighbours per row, ``k < N``.
    Returns:
        ``(dist [N, k], idx [N, k])``, float32, ascending per row: the ``k + 1`` smallest
        entries of each row minus the first (the row itself).
    """
    x = x.double()
    n = x.shape[0]
    sq = (x * x).sum(dim=1)
    rows = max(1, chunk_bytes // max(1, 8 * n))
    dists, idxs = [], []
    for start in range(0, n, rows):
        part = x[start:start + rows]
        d = (sq[start:start + rows, None] + sq[None]).sub_(part @ x.t(), alpha=2.0)  # [c, N]
        vals, idx = d.topk(k + 1, dim=1, largest=False)
        dists.append(vals[:, 1:].float())
        idxs.append(idx[:, 1:])
    return torch.cat(dists), torch.cat(idxs)


def lof_scores(x: torch.Tensor, k: int = LOF_NEIGHBOURS) -> torch.Tensor:
    """SC-CLIP's local outlier factor of every row of ``x``.

    The official variant: the reachability distance takes the row's **own** k-distance,
    ``reach_ij = max(D_ij, kdist_i)`` (textbook LOF: ``kdist_j``), so
    ``LOF_i = kdist_i * mean_{j in kNN(i)} 1 / kdist_j`` on squared distances.

    Args:
        x: ``[N, width]``, the raw residual stream of the patches.
        k: neighbours (fewer when ``N <= k``).
    Returns:
        ``[N]`` float32 (all 1 when ``N < 2``).
    """
    n = x.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return torch.ones(n, device=x.device)
    dist, idx = knn_sq_distances(x, k)
    kdist = dist.max(dim=1).values
    reach = torch.maximum(dist, kdist[:, None])
    lrd = torch.nan_to_num(reach.mean(dim=1), nan=1e-6).reciprocal() * k
    return lrd[idx].mean(dim=1) / lrd


def lof_outliers(x: torch.Tensor, k: int = LOF_NEIGHBOURS,
                 quantile: float = LOF_QUANTILE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows whose :func:`lof_scores` exceed their ``quantile`` (linear interpolation).

    Args:
        x: ``[N, width]``.
    Returns:
        ``(idx [K] ascending, scores [N], threshold [])``; ``K`` is 10 for ``N = 196``.
    """
    scores = lof_scores(x, k)
    threshold = torch.quantile(scores, quantile)
    return torch.nonzero(scores > threshold).flatten(), scores, threshold


def som_scores(q: torch.Tensor, k: torch.Tensor, cls_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SFP's CLS-to-patch and self attention of block ``L-1``, averaged over heads.

    Args:
        q, k: ``[heads, 1+N, d]``, the block's queries and keys (CLS first).
        cls_scale: factor of the CLS row's patch entries (SFP: ``5 * res_cls``).
    Returns:
        ``(c2p [N], self [N])`` float32: ``mean_h cls_scale * A_h[0, i]`` and
        ``mean_h A_h[i, i]`` for the patches ``i``, ``A_h = softmax(d**-0.5 q_h k_h^T)``.
    """
    heads, tokens, d = q.shape
    c2p = torch.zeros(tokens - 1, device=q.device)
    own = torch.zeros(tokens - 1, device=q.device)
    for h in range(heads):  # one [1+N, 1+N] matrix at a time
        a = torch.softmax((q[h].float() @ k[h].float().t()) * d ** -0.5, dim=-1)
        c2p += a[0, 1:] * cls_scale
        own += a.diagonal()[1:]
    return c2p / heads, own / heads


def som_outliers(c2p: torch.Tensor, own: torch.Tensor, top: int = TOP_OUTLIERS) -> torch.Tensor:
    """The salient patches (``c2p > own``) with the ``top`` largest ``c2p``.

    Args:
        c2p, own: ``[N]`` (:func:`som_scores`).
    Returns:
        ``[K]`` ascending, ``K = min(top, salient patches)``.
    """
    salient = c2p > own
    count = min(top, int(salient.sum()))
    idx = torch.where(salient, c2p, torch.full_like(c2p, -torch.inf)).topk(count).indices
    return idx.sort().values


def l2_outliers(x: torch.Tensor, top: int = TOP_OUTLIERS) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` rows of ``x [N, width]`` with the largest L2 norm.

    Returns:
        ``(idx [min(top, N)] ascending, norms [N] float32)``.
    """
    norms = x.float().norm(dim=-1)
    return norms.topk(min(top, norms.shape[0])).indices.sort().values, norms


# ---------------------------------------------------------------------- the calibration
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def mean_interpolation(x: torch.Tensor, grid: tuple[int, int], idx: torch.Tensor,
                       isolated: str = "keep") -> torch.Tensor:
    """Replace outliers by the mean of their non-outlier grid neighbours.

    All outliers at once, from the original values: an outlier at row-major grid position
    ``(r, c) = (i // w, i % w)`` becomes the mean of its 8 neighbours (3 x 3 without the
    centre) that are inside the grid and not outliers.

    Args:
        x: ``[N, width]``, the patches row-major over ``grid = (h, w)``.
        idx: ``[K]`` outlier indices.
        isolated: an outlier without such a neighbour ``"keep"``s its vector (SC-CLIP)
            or becomes ``"zero"`` (the official SFP).
    Returns:
        ``[N, width]``, a new tensor in the dtype of ``x``.
    """
    out = x.clone()
    if idx.numel() == 0:
        return out
    h, w = grid
    is_outlier = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    is_outlier[idx] = True
    offsets = torch.tensor(_OFFSETS, device=x.device)
    rows = (idx // w)[:, None] + offsets[:, 0]  # [K, 8]
    cols = (idx % w)[:, None] + offsets[:, 1]
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    neighbour = rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)
    valid = inside & ~is_outlier[neighbour]
    count = valid.sum(dim=1)
    total = (x[neighbour] * valid[..., None].to(x.dtype)).sum(dim=1)  # [K, width]
    mean = total / count.clamp(min=1)[:, None].to(x.dtype)
    lonely = count == 0
    mean[lonely] = x[idx[lonely]] if isolated == "keep" else 0
    out[idx] = mean
    return out


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """``[N, width] -> [N, N]`` float32 cosine similarities of the rows."""
    x = F.normalize(x.float(), dim=-1)
    return x @ x.t()


def cut(s: torch.Tensor, threshold: float = SIM_THRESHOLD) -> torch.Tensor:
    """``s`` where ``s >= threshold``, else 0 (``[N, N]``, a new tensor)."""
    return torch.where(s >= threshold, s, torch.zeros((), dtype=s.dtype, device=s.device))


def aggregate(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Row-normalised weighted means: ``(T / (T.sum(-1) + 1e-6)) @ x``.

    Args:
        x: ``[N, width]``.
        weights: ``T [N, N]``, non-negative (a :func:`cut` similarity).
    Returns:
        ``[N, width]`` float32.
    """
    return (weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)) @ x.float()


def posmix(s: torch.Tensor, temperature: float = POSMIX_TEMPERATURE) -> torch.Tensor:
    """The attention of a similarity matrix: a row softmax of ``M = t (S - mean(S))`` with
    every ``M < 0`` masked (``mean`` over all ``N^2`` entries; ``M == 0`` stays).

    Args:
        s: ``[N, N]`` float32 with a non-negative diagonal (cosines), so no row is empty.
    Returns:
        ``[N, N]`` float32, rows sum to 1.
    """
    m = temperature * (s - s.mean())
    return torch.softmax(m.masked_fill(m < 0, -torch.inf), dim=-1)


def mixed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mix: torch.Tensor,
                    kk: bool = True, qq: bool = False) -> torch.Tensor:
    """``(mix + [softmax(s k k^T)] + [softmax(s q q^T)]) / terms @ v`` per head, in float32.

    ``mix`` is the same for every head; ``s = d**-0.5``.

    Args:
        q, k, v: ``[heads, N, d]``.
        mix: ``[N, N]`` float32, rows sum to 1 (:func:`posmix`).
        kk, qq: add the k-k and/or q-q self-attention of each head.
    Returns:
        ``[N, heads * d]`` float32, the heads concatenated.
    """
    heads, n, d = v.shape
    v = v.float()
    out = mix @ v.transpose(0, 1).reshape(n, heads * d)  # one product for every head
    for h in range(heads):  # one [N, N] matrix at a time
        extra = None
        for use, a in ((kk, k), (qq, q)):
            if use:
                a = a[h].float()
                soft = torch.softmax((a @ a.t()) * d ** -0.5, dim=-1)
                extra = soft if extra is None else extra + soft
        if extra is not None:
            out[:, h * d:(h + 1) * d] += extra @ v[h]
    return out / (1 + kk + qq)


# ---------------------------------------------------------------------- the methods
class SelfCalibratedCLIP(DenseCLIP):
    """The frame SC-CLIP and SFP share; subclasses set the indices, detector and attention.

    Blocks ``1 .. L-1`` run unchanged (batched); the outliers, the calibrated last block
    and the two branches run per image. Subclass attributes: ``pre_state``,
    ``post_state`` (the ``i`` of ``F_i``), ``multi_states`` (a range of ``i``), ``res_cls``,
    ``isolated`` (see :func:`mean_interpolation`), ``mix_of_cut`` (posmix of ``cut(S_pre)``
    instead of ``S_pre``), ``main_terms`` / ``multi_terms`` (``(kk, qq)`` of
    :func:`mixed_attention`).
    """

    name = ""
    isolated = "keep"
    mix_of_cut = False
    main_terms = (True, False)
    multi_terms = (True, False)

    def __init__(self, clip_model: nn.Module, options: dict, tokenizer=None):
        super().__init__(clip_model, tokenizer, method=self.name, options=options)
        self.res_cls = float(self.options["res_cls"])

    @property
    def num_blocks(self) -> int:
        """``L``, the blocks of the image tower."""
        return len(self._blocks)

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        visual = self.visual
        return interpolate_pos_encoding(visual.positional_embedding, tuple(visual.grid_size), grid)

    def _needs_block_attention(self) -> bool:
        return False

    def _detect(self, patches: torch.Tensor, attention_input: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """``patches [N, width]`` float32 (``F_{L-1}[1:]``) -> ``(outliers [K], diagnostics)``."""
        idx, scores, threshold = lof_outliers(patches)
        return idx, {"lof_scores": scores, "lof_threshold": threshold}

    def _qkv(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x [T, width] -> [3, heads, T, d]``: ``ln_1`` and the packed projection, model dtype."""
        attn: nn.MultiheadAttention = block.attn
        tokens, width = x.shape
        qkv = F.linear(block.ln_1(x.to(self.dtype)), attn.in_proj_weight, attn.in_proj_bias)
        return qkv.reshape(tokens, 3, attn.num_heads, width // attn.num_heads).permute(1, 2, 0, 3)

    def _branch(self, block: nn.Module, x: torch.Tensor, mix: torch.Tensor, terms: tuple[bool, bool]) -> torch.Tensor:
        """The calibrated last block on ``x [N, width]``: ``out_proj(A v)``, no residual, no FFN; float32."""
        q, k, v = self._qkv(block, x).unbind(0)
        out = mixed_attention(q, k, v, mix, kk=terms[0], qq=terms[1])
        out = F.linear(out.to(self.dtype), block.attn.out_proj.weight, block.attn.out_proj.bias)
        return block.ls_1(out).float()  # ls_1: identity on the OpenAI CLIPs the official code runs

    def _tower(self, images: torch.Tensor):
        """Blocks ``1 .. L-1`` of the unmodified tower, batched.

        Returns:
            ``(states {i: F_i [B, 1+N, width]} for the kept i, R [B, 1+N, width] the sum of
            the multi-level states, attention_input F_{L-2} or None)``.
        """
        blocks = self._blocks
        last = len(blocks) - 1
        keep = {self.pre_state, self.post_state, last}
        x = self._embed(images)
        states, multi, attention_input = {}, None, None
        for i, block in enumerate(blocks[:-1], start=1):
            if i == last and self._needs_block_attention():
                attention_input = x
            x = self._run_blocks([block], x)
            if i in keep:
                states[i] = x
            if i in self.multi_states:
                multi = x if multi is None else multi + x
        return states, multi, attention_input

    def _window(self, f_last, f_pre, f_post, multi, attention_input, grid, trace: bool):
        """One image: ``F_{L-1}``, ``F_pre``, ``F_post``, ``R`` ``[1+N, width]`` -> ``[1+N, D]``."""
        block = self._blocks[-1]
        patches = f_last[1:].float()
        idx, info = self._detect(patches, attention_input)
        fixed = mean_interpolation(patches, grid, idx, self.isolated)
        s_pre = cosine_matrix(mean_interpolation(f_pre[1:].float(), grid, idx, self.isolated))
        cut_pre = cut(s_pre)
        main_in = aggregate(fixed, cut_pre)
        mix = posmix(cut_pre if self.mix_of_cut else s_pre)
        del cut_pre
        if not trace:
            del s_pre
        s_post = cosine_matrix(f_post[1:])
        cut_post = cut(s_post)
        if not trace:
            del s_post
        main = aggregate(self._branch(block, main_in, mix, self.main_terms) + self.res_cls * f_last[0].float(),
                         cut_post)
        side = aggregate(self._branch(block, multi[1:], mix, self.multi_terms) + self.res_cls * multi[0].float(),
                         cut_post)
        tokens = self._project(torch.cat([f_last[:1], (main + side).to(self.dtype)]))
        if not trace:
            return tokens, None
        info.update(outlier_idx=idx, outlier_tokens_fixed=fixed[idx], S_pre=s_pre, S_post=s_post,
                    main_branch=main, multi_branch=side)
        return tokens, info

    def encode_image(self, images: torch.Tensor, return_intermediates: bool = False):
        """Dense tokens.

        Args:
            images: ``[B, 3, H, W]``, normalised with the model's mean/std.
            return_intermediates: also return, per image, a dict of float32 tensors:
                ``outlier_idx [K]`` (ascending), ``outlier_tokens_fixed [K, width]``,
                ``S_pre``, ``S_post`` ``[N, N]`` (before ``cut``), ``main_branch``,
                ``multi_branch`` ``[N, width]`` (before ``ln_post``) and the detector's
                scores (``lof_scores [N]``, ``lof_threshold``; ``som_cls_to_patch``,
                ``som_self [N]``; ``l2_norms [N]``).
        Returns:
            ``[B, 1+N, D]`` in the model's dtype, after ``ln_post`` and the projection, not
            normalised: row 0 the projected CLS of ``F_{L-1}``, rows ``1..N`` the patches
            row-major; with ``return_intermediates``, ``(tokens, [dict] * B)``.
        """
        grid = self.grid_for(images.shape[-2], images.shape[-1])
        states, multi, attention_input = self._tower(images)
        last = self.num_blocks - 1
        outs, traces = [], []
        for b in range(images.shape[0]):
            tokens, info = self._window(states[last][b], states[self.pre_state][b], states[self.post_state][b],
                                        multi[b], None if attention_input is None else attention_input[b],
                                        grid, return_intermediates)
            outs.append(tokens)
            traces.append(info)
        tokens = torch.stack(outs)
        return (tokens, traces) if return_intermediates else tokens


class SCCLIP(SelfCalibratedCLIP):
    """SC-CLIP (Bai et al., "Self-Calibrated CLIP for Training-Free Open-Vocabulary Segmentation").

    Options: ``pre_adjust_idx`` (8), ``post_adjust_idx`` (3), ``multi_start_idx`` (3),
    ``multi_end_idx`` (10), ``res_cls`` (0.3); see the module docstring.

    Raises:
        MethodError: an index beyond the tower's depth (``pre_adjust_idx`` and
            ``post_adjust_idx`` at most ``L - 2``, ``multi_end_idx`` at most ``L - 1``).
    """

    name = "scclip"

    def __init__(self, clip_model: nn.Module, options: dict, tokenizer=None):
        super().__init__(clip_model, options, tokenizer)
        o, depth = self.options, self.num_blocks
        too_deep = [f"{key}={o[key]}" for key, top in (("pre_adjust_idx", depth - 2), ("post_adjust_idx", depth - 2),
                                                       ("multi_end_idx", depth - 1)) if o[key] > top]
        if too_deep or o["multi_start_idx"] >= o["multi_end_idx"]:
            raise MethodError(
                f"invalid options for method 'scclip': {', '.join(too_deep) or 'multi_start_idx >= multi_end_idx'} "
                f"on an image tower of {depth} blocks; valid: pre_adjust_idx and post_adjust_idx 0..{depth - 2}, "
                f"0 <= multi_start_idx < multi_end_idx <= {depth - 1} (the hidden states F_1..F_{depth - 1} "
                "before the last block)")
        self.pre_state = o["pre_adjust_idx"] + 1
        self.post_state = o["post_adjust_idx"] + 1
        self.multi_states = range(o["multi_start_idx"] + 1, o["multi_end_idx"] + 1)


class SFP(SelfCalibratedCLIP):
    """SFP (ICCV 2025): SC-CLIP's frame with selectable outliers and thresholded similarities.

    Options: ``pm`` ``"SOM"`` (default), ``"L2"`` or ``"LOF"``; ``res_cls`` (0.3, also the
    SOM detector's CLS scale ``5 res_cls``); see the module docstring.

    Raises:
        MethodError: a tower of fewer than 11 blocks (SFP reads ``F_9`` and ``F_4 .. F_10``).
    """

    name = "sfp"
    mix_of_cut = True
    main_terms = (True, True)
    multi_terms = (False, False)
    pre_state, post_state, multi_states = 9, 4, range(4, 11)
    min_blocks = 11

    def __init__(self, clip_model: nn.Module, options: dict, tokenizer=None):
        super().__init__(clip_model, options, tokenizer)
        if self.num_blocks < self.min_blocks:
            raise MethodError(f"method 'sfp' needs an image tower of at least {self.min_blocks} blocks "
                              f"(it reads the hidden states F_4..F_10); this one has {self.num_blocks} blocks")
        self.pm = self.options["pm"]

    def _needs_block_attention(self) -> bool:
        return self.pm == "SOM"

    def _detect(self, patches: torch.Tensor, attention_input: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        if self.pm == "LOF":
            return super()._detect(patches, attention_input)
        if self.pm == "L2":
            idx, norms = l2_outliers(patches)
            return idx, {"l2_norms": norms}
        q, k, _ = self._qkv(self._blocks[-2], attention_input).unbind(0)
        c2p, own = som_scores(q, k, 5 * self.res_cls)
        return som_outliers(c2p, own), {"som_cls_to_patch": c2p, "som_self": own}

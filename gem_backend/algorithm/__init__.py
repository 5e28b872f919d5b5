"""The algorithm: (SAM 2 regions) -> CLIP + GEM or a successor -> maps -> refinement -> decision -> (vote) -> masks.

numpy and torch in and out; no HTTP, no Label Studio, no Redis (``tests/test_structure.py``
checks it). Shapes are in every docstring: ``B`` images, ``H x W`` pixels, grid ``h x w``,
``N = h * w`` patch tokens, ``D`` the embedding size, ``C`` labels.

Modules and their public names:

- :mod:`.dense`: :class:`DenseCLIP`, what every method shares (text tower, similarity maps,
  model checks, the positional-embedding resizes ``resample_pos_embed`` and
  ``interpolate_pos_encoding``), and ``CLIPMethod`` (plain CLIP patch tokens).
- :mod:`.gem`: :class:`GEM` (the image tower with GEM's self-self attention path) and
  ``GEMMethod``.
- :mod:`.lastblock`: SCLIP, ClearCLIP, NACLIP (a modified last block).
- :mod:`.scclip`: SC-CLIP and SFP (``SCCLIP``, ``SFP``: outliers fixed, a self-calibrated last
  block) and their pieces (``lof_outliers``, ``som_outliers``, ``mean_interpolation``, ``posmix``, ...).
- :mod:`.corrclip`: :class:`CorrCLIP` (DINO v1 affinity in the last block, scoped by a region
  map; ``uses_regions``), ``merge_regions``, ``corrclip_scope``.
- :mod:`.dino`: :func:`load_dino` (DINO v1 on timm's ViT, a name's hub weights or a file,
  shared per process) -> :class:`DINO` (``qk_features``).
- :mod:`.windows`: the official sliding-window arithmetic shared by eval and serving
  (``sliding_windows``, ``window_tokens``, ``window_logits``, ``REGION_PAD``).
- :mod:`.refine`: ``pamr``.
- :mod:`.hub`: ``ModelLoadError`` and the fast hub-reachability check the loaders share.
- :mod:`.methods`: the one factory, ``create_method`` / ``check_method_options`` /
  ``method_names``.
- :mod:`.models`: :func:`load_gem_model` (the one factory: an open_clip name or config and
  weights -> :class:`LoadedModel`), ``resolve_device``, ``resolve_dtype``,
  ``cpu_has_native_bf16``, ``weights_id``, ``ModelLoadError``.
- :mod:`.segmentation`: :class:`GEMPredictor` (the image embedding once, cheap predictions on
  it), :class:`ImageEmbedding`, :class:`Segmentation`, :class:`SegmentationSettings`,
  ``model_input_size``, ``blend_prototypes``, ``resize_nearest``, ``nearest_indices``.
- :mod:`.regions`: class-agnostic regions (instance maps), ``paint_regions``, ``vote_regions``.
- :mod:`.sam`: SAM 2 (the optional ``sam2`` extra): ``load_sam2``, ``RegionGenerator`` (automatic
  masks -> instance map), ``encode_regions`` / ``decode_regions`` (compact bytes for caches).
- :mod:`.geometry`: connected components, outlines, polygons, boxes of masks.
"""

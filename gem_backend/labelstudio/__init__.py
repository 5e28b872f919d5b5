"""Label Studio's side: the labeling spec, images, results JSON, the API client.

No model and no server here: these modules speak Label Studio's formats.

- :mod:`.spec`: the labeling config -> targets (``parse_labeling_config``, ``LabelingConfig``,
  ``BrushTarget``, ``BitmaskTarget``, ``PolygonTarget``, ``RectangleTarget``, ``ChoicesTarget``,
  ``TextPromptTarget``, ``LabelConfigError``, ``match_label``).
- :mod:`.images`: task image URLs -> RGB images (``ImageFetcher`` with Label Studio's
  credentials and an SSRF guard, ``decode_image``, ``load_image_file``, ``ImageError``).
- :mod:`.interactive`: smart-tool clicks and boxes (``parse_context``, ``select_region``).
- :mod:`.results`: masks and shapes -> results (``brush_region``, ``bitmask_region``, ``polygon_region``,
  ``rectangle_region``, ``choices_region``, ``prediction``).
- :mod:`.annotations`: results -> masks and label maps (``result_masks``, ``label_map``,
  ``region_mask``: brush RLE, polygons, rectangles, bitmask PNGs; ``AnnotationError``).
- :mod:`.bitmask`: BitmaskLabels PNGs from a small label map (``label_pngs``, ``mask_png``).
- :mod:`.brush`: Label Studio's brush RLE (``mask2rle``, ``rle2mask``), byte-identical to the SDK's.
- :mod:`.api`: the API client of the jobs (``LabelStudioAPI``, ``LabelStudioError``).
"""

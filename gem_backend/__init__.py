"""gem-backend: zero-shot segmentation with GEM on open_clip, served as a Label Studio ML backend.

Data path: request -> labeling spec (``labelstudio``) -> image (``images``) -> GEM (``gem``)
-> masks (``segmentation``) -> Label Studio JSON (``labelstudio``, ``brush``).
"""

__version__ = "0.1.0"

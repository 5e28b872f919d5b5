"""Serving: the ML backend Label Studio talks to.

- :mod:`.app`: the Flask application factory (``create_app``): ``/health``, ``/setup``,
  ``/predict``, ``/webhook``, ``/versions``, ``/metrics``; ``_wsgi.py`` serves it with gunicorn.
- :mod:`.service`: ``GEMService``, the prediction service without HTTP: request -> labeling
  spec -> image -> model -> masks -> Label Studio JSON, per task isolated
  (``ProjectSpec``, ``RequestError``, ``ModelUnavailable``).
- :mod:`.text_cache`: text embeddings (``TextEmbeddingCache``, in process + Redis).
- :mod:`.feature_cache`: image features for smart-tool clicks and SAM 2 regions (``EmbeddingCache``,
  ``RegionCache``, both a ``TwoLevelCache``: in process + Redis).
- :mod:`.redis_gate`: one Redis client with outage back-off (``RedisGate``).
- :mod:`.prototypes`: label prototypes learnt from annotations and their durable stores
  (``PrototypeStore``, ``open_store``; the service reads them, the webhook writes them).
- :mod:`.webhook_queue`: the queue and thread of a ``/webhook`` consumer (``WebhookQueue``).
- :mod:`.learner`: the ``/webhook`` learner (``Learner``).
- :mod:`.agreement`: agreement of annotations with the predictions (``Agreement``, its stores).
- :mod:`.metrics`: Prometheus metrics (``Metrics``).
"""

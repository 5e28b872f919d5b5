"""WSGI entry point, as in the official Label Studio ML examples: ``gunicorn _wsgi:app``.

Settings come from the environment (see README). Importing this module builds the app and
starts loading the model in the background; ``/health`` answers meanwhile.
"""

from gem_backend.serving.app import create_app
from gem_backend.settings import Settings, configure_torch_threads

# one per gunicorn worker: cores / WORKERS torch threads (GEM_TORCH_THREADS overrides)
configure_torch_threads(Settings.from_env(), what="gunicorn worker")
app = create_app()

if __name__ == "__main__":
    s = Settings.from_env()
    app.run(host=s.host, port=s.port, threaded=True)

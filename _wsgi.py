"""WSGI entry point, as in the official Label Studio ML examples: ``gunicorn _wsgi:app``.

Settings come from the environment (see README). Importing this module builds the app and
starts loading the model in the background; ``/health`` answers meanwhile.
"""

from gem_backend.serving.app import create_app

app = create_app()

if __name__ == "__main__":
    from gem_backend.settings import Settings

    s = Settings.from_env()
    app.run(host=s.host, port=s.port, threaded=True)

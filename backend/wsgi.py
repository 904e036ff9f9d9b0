"""gunicorn entry: ``gunicorn --preload --workers 1 --threads 8 --timeout 0 --bind 0.0.0.0:9090 backend.wsgi:app``.

Settings come from the environment (``DEMO=true`` for the bundled tiny models).
"""
from .app import create_app
from .config import Settings, demo_from_env

app = create_app(Settings.from_env(demo=demo_from_env()))

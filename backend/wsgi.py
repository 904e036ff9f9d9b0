"""WSGI entry for any WSGI server, e.g. ``python -m waitress --listen=0.0.0.0:9090 backend.wsgi:app``
(``python -m backend serve`` is the same app on waitress with the tested options).

Settings come from the environment (``DEMO=true`` for the bundled tiny models).
"""
from .app import create_app
from .config import Settings, demo_from_env

app = create_app(Settings.from_env(demo=demo_from_env()))

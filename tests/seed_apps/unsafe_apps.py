"""Huey apps whose storage the suite cannot make crash-safe."""
import os
import tempfile

from huey import MemoryHuey, SqliteHuey

sqlite_app = SqliteHuey('local', filename=os.path.join(
    os.environ.get('UNSAFE_APPS_DIR') or tempfile.gettempdir(),
    'unsafe-apps.db'))
memory_app = MemoryHuey('local')

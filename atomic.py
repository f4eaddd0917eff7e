"""Files written whole or not at all.

Every file the project writes goes through atomic_path: the downloaded archives, and a run's model,
checkpoint, metrics and figures. A crash, an error or Ctrl-C mid-write leaves the previous file (or
none), never half of one.
"""
import contextlib
import os


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block finishes."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

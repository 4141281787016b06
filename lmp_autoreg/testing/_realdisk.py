"""Reach the real disk even while a test has pyfakefs active."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def real_disk() -> Iterator[None]:
    """Pause pyfakefs (if it is loaded and patching) for the body of the ``with``.

    The loopback server writes its CA and TLS files to a real temporary directory, because
    ``ssl`` and the HTTP client read them with the real file system. Pausing is global, so
    it is used only for these short writes and removals, never while serving.
    """
    module = sys.modules.get("pyfakefs.fake_filesystem_unittest")
    patcher = getattr(getattr(module, "Patcher", None), "PATCHER", None)
    if patcher is None or not patcher.is_patching:
        yield
        return
    patcher.pause()
    try:
        yield
    finally:
        patcher.resume()

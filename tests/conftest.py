"""Shared pytest helpers."""

import os
import shutil
import sys
from pathlib import Path

import pytest


def require_tool(name: str) -> str:
    """Return the path of executable `name`, looked up on PATH and beside the running Python.

    A missing tool skips the test on a developer's machine but fails it in CI (env var CI
    set), so that CI never passes by silently skipping a check.
    """
    here = str(Path(sys.executable).parent)
    path = shutil.which(name) or shutil.which(name, path=here)
    if path is None:
        message = f"required tool {name!r} not found on PATH or in {here}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path

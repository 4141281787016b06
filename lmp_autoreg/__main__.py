"""``python -m lmp_autoreg``: the same as the ``lmp-device-auto-register`` command."""

from .cli import run

run()

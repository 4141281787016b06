"""``python -m lmp_autoreg``: the same as the ``lmp-device-auto-register`` command."""

import sys

from .cli import main

sys.exit(main())

"""lmp_autoreg: register a Foundries.io LmP device with its factory, once.

Read top-down:

- ``guard``     the light first check of every start: where the sota dir is, and is the
                device already registered (nothing heavier than ``os``: most starts end here)
- ``der``       a small DER reader for the subject and expiry of ``client.pem``, without
                ``cryptography`` (used by ``guard`` and ``status``)
- ``settings``  where every setting comes from (CLI > env > default file > device files)
- ``paths``     the device's file layout, resolved under ``--sysroot``
- ``errors``    one exception per exit code
- ``identity``  EC key, CSR, and checks of what the server sent back
- ``client``    the HTTP request to the registration server
- ``install``   verify the answer and install it into the sota dir atomically
- ``retry``     the backoff policy and the retry loop, bounded by the deadline
- ``state``     one identity per device, the lock, the install journal (``<sota>/.lmp-autoreg``)
- ``preflight`` checks before anything is sent: token over plain http, warnings, the clock
- ``progress``, ``testhook``  status lines; the test-only pause at named steps
- ``register``  the one library function that does a registration end to end
- ``backend_ldr`` the alternative backend: run the C++ ``lmp-device-register``
- ``poststeps`` fioconfig check-in, service starts, poweroff
- ``log``, ``journal``  stderr logging; journald fields and sd_notify under systemd
- ``util``      small wrappers: atomic file writes, running commands, the random uuid
- ``status``    is this device registered, and as what
- ``cli``       argparse, output, JSON, exit codes
- ``demo``      a whole registration against an embedded loopback server
- ``testing``   the public test kit (loopback server, fake device, pytest plugin)
"""

__version__ = "0.1.0"
PROG = "lmp-device-auto-register"
# Choices of --backend and --fioconfig, here so that the command line needs no other module.
BACKENDS = ("native", "lmp-device-register")
FIOCONFIG_MODES = ("auto", "on", "off")
# A device clock earlier than this cannot be right: certificates would look "not yet valid".
RELEASE_DATE = "2026-11-27"

"""lmp_autoreg: register a Foundries.io LmP device with its factory, once.

Read top-down; a module imports only modules listed above it (tests/test_structure.py
checks that no import, not even one inside a function, goes round in a circle):

- ``errors``    one exception per exit code
- ``checked``   bytes from outside (answers, device files, settings) become checked
                values, with an error naming where they came from
- ``der``       a small DER reader for the subject and expiry of ``client.pem``, without
                ``cryptography`` (used by ``guard`` and ``status``)
- ``guard``     the light first check of every start: where the sota dir is, and is the
                device already registered (nothing heavier than ``os``: most starts end here)
- ``paths``     the device's file layout, resolved under ``--sysroot``
- ``board``     the board's own serial number (device tree, DMI, wired MAC), for the result
- ``preflight`` checks before anything is sent: token over plain http, warnings, the clock
- ``settings``  where every setting comes from (CLI > env > default file > device files)
- ``util``      small wrappers: atomic file writes, running commands, the random uuid
- ``progress``  status lines, and ``PROMPT``, the level of what a person must act on
- ``journal``, ``log``  journald fields and sd_notify under systemd; stderr logging
- ``testhook``  TEST-ONLY: the one place the test seams are read (a pause at named steps,
                the "is systemd running" directory)
- ``result``    ``Result``, the record of what a run did (the JSON object's keys)
- ``devicekey`` the interface of a device key (a key in a file, or on a PKCS#11 token)
- ``identity``  the key in a file, the CSR, and checks of what the server sent back
- ``hsm``       the key on a PKCS#11 token (python-pkcs11; imported in HSM mode only)
- ``client``    the HTTP request to the registration server
- ``install``   verify the answer and install it into the sota dir atomically
- ``retry``     the backoff policy and the retry loop, bounded by the deadline
- ``oauth``     registering by hand: the OAuth device authorization flow (RFC 8628)
- ``handoff``   the OAuth access token to lmp-device-register over loopback, not argv
- ``state``     the files of one identity per device, the lock, the install journal
                (``<sota>/.lmp-autoreg``)
- ``attempt``   ``Attempt``: the life of one attempt (lock, identity, journal, install)
- ``backend_ldr`` the alternative backend: run the C++ ``lmp-device-register``
- ``poststeps`` fioconfig check-in, service starts, poweroff
- ``register``  the one library function that does a registration end to end
- ``status``    is this device registered, and as what
- ``testing``   the public test kit (loopback server, fake device, pytest plugin)
- ``output``    what the commands print: text, or one JSON object
- ``demo``      a whole registration against an embedded loopback server
- ``cli``       argparse, exit codes; the console script
"""

__version__ = "0.1.0"
PROG = "lmp-device-auto-register"
# Choices of --backend and --fioconfig, here so that the command line needs no other module.
BACKENDS = ("native", "lmp-device-register")
FIOCONFIG_MODES = ("auto", "on", "off")
# A device clock earlier than this cannot be right: certificates would look "not yet valid".
RELEASE_DATE = "2026-11-27"

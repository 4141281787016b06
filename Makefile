# lmp-autoreg: `make demo` and `make test` work on a fresh machine; everything lives in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# systemd-python builds only where libsystemd's headers are installed (.ci/run installs them).
EXTRAS := test,dev,kit$(shell pkg-config --exists libsystemd 2>/dev/null && echo ,systemd)
PYTEST_ARGS ?=

.PHONY: all venv demo test test-long test-target lint bench bench-check \
	bench-target boot-test line bench-line clean FORCE

all: test

# The stamp holds the EXTRAS the venv was installed with. When the machine changes (say
# libsystemd-dev is installed after the first make), EXTRAS differs from the stamp, and the
# next make installs again with the new set instead of skipping systemd-python until a clean.
ifneq ($(file <$(STAMP)),$(EXTRAS))
$(STAMP): FORCE
endif
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	echo '$(EXTRAS)' > $(STAMP)

FORCE:

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmp-device-auto-register demo

# Four workers on two cores: most tests wait on a server, a subprocess or a deadline more
# than they compute (docs/testing.md, "Tests that hold under load").
test: $(STAMP)
	$(PY) -m pytest -n 4 $(PYTEST_ARGS)

# The property-based tests of bad input with the long Hypothesis profile (new random cases,
# at least 2000 per family; docs/reliability.md, "Bad input"). Not part of `make test`.
test-long: $(STAMP)
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -n 2 -m props --timeout 0 $(PYTEST_ARGS)

# The whole suite a second time on the target's Python: Python 3.14 with wrynose's library
# versions, in a Debian forky root made with debootstrap and cached (target/run.py; needs
# root, README). Runs with the host's python3 alone: the root has its own venv.
# ARCH=arm64 does it in an arm64 root under user-mode emulation (qemu-user-static and
# binfmt_misc), without the few tests emulation cannot run (target/run.py's
# EMULATION_LIMITS; README).
ARCH ?=
TARGET_ARCH := $(if $(ARCH),--arch $(ARCH))
test-target:
	$(PYTHON) target/run.py $(TARGET_ARCH) test $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check lmp_autoreg tests bench boot target
	$(VENV)/bin/mypy lmp_autoreg bench
	$(VENV)/bin/mypy boot
	$(VENV)/bin/mypy target

# Cold-process timings against the interpreter's floor (docs/performance.md); never part of
# `make test`. bench-check exits non-zero when a scenario fails or a budget is missed.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

bench-check: $(STAMP)
	$(PY) bench/run.py --check $(BENCH_ARGS)

# A rehearsed factory line (docs/testing.md): 50 devices through the kit's server with a
# restart, lost answers and a burst of 503s; the record, summary and pictures in LINE_OUT.
LINE_OUT ?= line-rehearsal
LINE_ARGS ?=
line: $(STAMP)
	rm -rf $(LINE_OUT)
	$(PY) -m lmp_autoreg.testing line --devices 50 --chaos restart,lost-answer,5xx \
		--out $(LINE_OUT) $(LINE_ARGS)

# The line's throughput at --parallel 1, 2 and the cores (docs/performance.md); the curve
# into docs/performance-line.png.
bench-line: $(STAMP)
	$(PY) bench/line.py --plot docs/performance-line.png $(BENCH_ARGS)

# The same in the forky root of test-target (results in bench/results/forky);
# BENCH_ARGS=--check for its budgets.
bench-target:
	$(PYTHON) target/run.py $(TARGET_ARCH) bench $(BENCH_ARGS)

# Boots the agent under a real systemd (systemd-nspawn; arm64 on an emulated machine,
# qemu-system-aarch64), once per scenario; needs root (README). Never part of `make test`.
BOOT_ARGS ?=
boot-test: $(STAMP)
	$(PY) boot/run.py $(BOOT_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

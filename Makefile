# lmp-autoreg: `make demo` and `make test` work on a fresh machine; everything lives in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# systemd-python builds only where libsystemd's headers are installed (.ci/run installs them).
EXTRAS := test,dev$(shell pkg-config --exists libsystemd 2>/dev/null && echo ,systemd)
PYTEST_ARGS ?=

.PHONY: all venv demo test lint clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmp-device-auto-register demo

test: $(STAMP)
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check lmp_autoreg tests
	$(VENV)/bin/mypy lmp_autoreg

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Two commands for a fresh clone with Python 3.11: `make demo` and `make test`.
# Installs come from the lock files in requirements/ (exact versions, hashes checked); `make lock` refreshes them.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps
SIM_PORT ?= 8765
WEB_PORT ?= 8000
DEMO_RATE ?= 3
PIP_TOOLS := pip-tools==7.6.2
LOCK := $(VENV)-lock/bin/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe \
	--no-emit-index-url --no-emit-find-links

.PHONY: demo test install lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The product and its simulator (what `make demo` runs).
$(VENV)/.demo-installed: requirements/demo.txt | $(PY)
	$(PIP_INSTALL) -r requirements/demo.txt
	touch $@

# The same plus the test tools (pytest, hypothesis, Playwright, the Genesys SDK).
$(VENV)/.test-installed: requirements/test.txt | $(PY)
	$(PIP_INSTALL) -r requirements/test.txt
	touch $@

install: $(VENV)/.test-installed

## make test: the whole suite (SQLite by default; set DATABASE_URL for PostgreSQL, REDIS_URL for Redis).
test: $(VENV)/.test-installed
	$(PY) -m pytest

## make demo: one process on the embedded defaults (SQLite, in-memory channel layer, in-process hooks): the
## Genesys simulator, the ingest worker and the web server (live page + admin). GENESYS_EVENT_SOURCE picks the source.
demo: $(VENV)/.demo-installed
	$(PY) manage.py demo --port $(WEB_PORT) --rate $(DEMO_RATE) --sim-port $(SIM_PORT)

## make lock: resolve pyproject.toml's dependencies into requirements/, keeping the pins that still fit;
## `make lock UPGRADE=--upgrade` moves every package to its newest allowed release.
lock:
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install --quiet $(PIP_TOOLS)
	$(LOCK) $(UPGRADE) --extra simulator --extra test -o requirements/test.txt pyproject.toml
	$(LOCK) $(UPGRADE) --extra simulator -c requirements/test.txt -o requirements/demo.txt pyproject.toml
	$(LOCK) $(UPGRADE) -c requirements/test.txt -o requirements/production.txt pyproject.toml

clean:
	rm -rf $(VENV) $(VENV)-lock .demo db.sqlite3 db.sqlite3-* .test-db.sqlite3*

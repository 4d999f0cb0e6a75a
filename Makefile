# Two commands for a fresh clone with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SIM_PORT ?= 8765
WEB_PORT ?= 8000
DEMO_RATE ?= 3

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## make test: the whole suite (SQLite by default; set DATABASE_URL for PostgreSQL).
test: $(STAMP)
	$(PY) -m pytest

## make demo: one process on the embedded defaults (SQLite, in-memory channel layer, in-process hooks): the
## Genesys simulator, the ingest worker and the web server (live page + admin). GENESYS_EVENT_SOURCE picks the source.
demo: $(STAMP)
	$(PY) manage.py demo --port $(WEB_PORT) --rate $(DEMO_RATE) --sim-port $(SIM_PORT)

clean:
	rm -rf $(VENV) .demo db.sqlite3 db.sqlite3-* .test-db.sqlite3*

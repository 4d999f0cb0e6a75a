# Two commands for a fresh clone with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SIM_PORT ?= 8765
WEB_PORT ?= 8000
DEMO_RATE ?= 3
DEMO_ENV := GENESYS_API_URL=http://127.0.0.1:$(SIM_PORT) GENESYS_LOGIN_URL=http://127.0.0.1:$(SIM_PORT) \
	GENESYSCLOUD_OAUTHCLIENT_ID=sim-client GENESYSCLOUD_OAUTHCLIENT_SECRET=sim-secret

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

## make demo: simulator + ingest worker + admin on the embedded defaults (SQLite, in-process everything).
demo: $(STAMP)
	$(PY) manage.py migrate --noinput
	$(PY) manage.py demo_user
	@mkdir -p .demo
	@trap 'kill 0' INT TERM EXIT; \
	$(PY) manage.py genesys_simulator --port $(SIM_PORT) --rate $(DEMO_RATE) > .demo/simulator.log 2>&1 & \
	sleep 2; \
	$(DEMO_ENV) $(PY) manage.py stream_events > .demo/stream_events.log 2>&1 & \
	$(PY) manage.py runserver 127.0.0.1:$(WEB_PORT) --noreload > .demo/web.log 2>&1 & \
	sleep 2; \
	echo ""; \
	echo "  Conversations arriving:  http://127.0.0.1:$(WEB_PORT)/admin/conversations/conversation/"; \
	echo "  Login:                   demo / demo   (demo only)"; \
	echo "  Simulator (fake Genesys): http://127.0.0.1:$(SIM_PORT)"; \
	echo "  Logs:                    .demo/*.log   (tail -f .demo/stream_events.log)"; \
	echo "  Stop:                    Ctrl-C"; \
	echo ""; \
	wait

clean:
	rm -rf $(VENV) .demo db.sqlite3 db.sqlite3-* .test-db.sqlite3*

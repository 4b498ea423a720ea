# Two commands for a fresh machine: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install chromium

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(VPY) -m pip install -q -e ".[app,test]"
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VPY) app.py --host 127.0.0.1 --port 7860

test: $(STAMP) chromium
	$(VPY) -m pytest -q -x --durations=15 $(PYTEST_ARGS)

# Headless Chromium for the app's screenshot test; best effort (the test says why it skips).
chromium:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
	  || echo "note: chromium not installed; the screenshot test will skip"; }

# Two commands for a fresh machine: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install bench

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(VPY) -m pip install -q -e ".[app,test]"
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VPY) app.py --host 127.0.0.1 --port 7860

test: $(STAMP)
	$(VPY) -m pytest -q -x --durations=15 $(PYTEST_ARGS)

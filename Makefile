# The two set-up commands (see README):
#   make demo   create .venv, install, start a broker if needed, run the agent on simulated sensors
#   make test   create .venv, install, make sure Mosquitto is there, run the whole test suite

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-quick bench clean

install: $(STAMP)

# torch is pinned to the CPU build through constraints.txt (a looser pin pulls CUDA).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/streamlearn demo

test: install
	scripts/ensure-mosquitto
	$(BIN)/python -m pytest

# everything but the slow fault-injection tests
test-quick: install
	$(BIN)/python -m pytest -m "not faults"

clean:
	rm -rf $(VENV) .demo .pytest_cache .hypothesis reports

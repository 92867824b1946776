# Two set-up commands: `make demo` and `make test`. Both build .venv once; a complete .venv is reused.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYNTH := data/synthetic

.PHONY: venv test demo clean

venv: $(STAMP)

# torch/torchvision are pinned here (pip takes them from this machine's disk); the project
# itself pins nothing tighter than it needs. The stamp makes a finished install idempotent.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -qq --upgrade pip
	@$(PY) -m pip install -qq torch==2.14.1 torchvision==0.29.1
	@$(PY) -m pip install -qq -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: $(STAMP)
	$(PY) tools/demo.py --out runs/demo

clean:
	rm -rf runs data .pytest_cache

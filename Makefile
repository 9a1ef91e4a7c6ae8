# Two commands on a fresh machine: `make tutorial` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test tutorial lint bench clean

install: $(STAMP)

# torch first and pinned: this exact version is a CPU wheel on the machine's disk;
# any other spec in a fresh venv pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,ray,flower]'
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(VENV)/bin/pytest -q

tutorial: install
	$(VENV)/bin/fedtext tutorial

clean:
	rm -rf $(VENV) build *.egg-info

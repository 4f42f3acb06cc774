# The two commands a new machine needs: `make demo` and `make test`.
# Everything is installed into .venv in the repository root.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
LE     := $(VENV)/bin/llava-edge
STAMP  := $(VENV)/.installed-stamp
DEMO   := demo

.PHONY: setup test test-slow demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned in pyproject (CPU wheel on disk); llama-cpp-python builds from source once, then pip caches it
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(LE) toy data --out $(DEMO)/data --n-stage1 200 --n-stage2 200 --n-eval 20
	$(LE) toy model --out $(DEMO)/model
	$(LE) export --model $(DEMO)/model --out $(DEMO)/bundle --set-default
	@echo "--- llava-edge chat --image $(DEMO)/data/images/eval_00000.png \"What shape is at the top left?\""
	$(LE) chat --image $(DEMO)/data/images/eval_00000.png "What shape is at the top left?" --max-tokens 32

clean:
	rm -rf $(DEMO) build *.egg-info

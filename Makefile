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
	# the whole recipe on the toy world: pretrain the halves, stage 1, stage 2 (about 6.5 minutes on 2 cores)
	$(LE) toy build --out $(DEMO)
	$(LE) export --model $(DEMO)/model --out $(DEMO)/bundle --set-default
	$(LE) info $(DEMO)/bundle
	@echo "--- what the held-out image $(DEMO)/data/images/eval_00002.png shows (ground truth):"
	@$(PY) -m llava_edge.toy.scenes $(DEMO)/data/eval.json eval_00002
	@for q in "Describe the image in detail." "What color are the shapes?" "How many shapes are there?"; do \
		echo "--- llava-edge chat --image $(DEMO)/data/images/eval_00002.png \"$$q\""; \
		$(LE) chat --image $(DEMO)/data/images/eval_00002.png "$$q"; done

clean:
	rm -rf $(DEMO) build *.egg-info

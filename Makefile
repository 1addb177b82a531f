# Two commands do everything on a fresh machine:
#   make train   create .venv, install trainer_pkg (runtime only), run the main job, evaluate it
#   make test    create .venv, install trainer_pkg with test extras, run the test suite
#
# The main job is the real one (pretrained mBERT fine-tuned on the full NSMC from the internet)
# unless ../shared holds the offline copies (NSMC files and the mBERT tokenizer/config, no
# weights): then it is the offline proxy, a 2-layer mBERT trained from scratch on the full corpus.
# It says which. Each `make train` writes a new run directory, runs/nsmc-<date>-<time>, unless
# OUTPUT_DIR names one (a run already there is refused, never replaced).
# Override with:  make train TRAIN_ARGS="--config configs/nsmc_mbert.yaml" OUTPUT_DIR=runs/x

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
SHARED ?= ../shared
ifndef OUTPUT_DIR
OUTPUT_DIR := runs/nsmc-$(shell date +%Y%m%d-%H%M%S)
endif
BIN := $(VENV)/bin

ifneq ($(wildcard $(SHARED)/data/nsmc/ratings_train.txt),)
JOB := the offline proxy ($(SHARED) holds NSMC and the mBERT tokenizer without weights)
TRAIN_ARGS ?= --config configs/nsmc_proxy_offline.yaml --data $(SHARED)/data/nsmc \
	--model $(SHARED)/models/bert-base-multilingual-uncased
else
JOB := the real job (pretrained mBERT, NSMC from the internet)
TRAIN_ARGS ?= --config configs/nsmc_mbert.yaml
endif

.PHONY: install train test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

train: install
	@echo "make train: $(JOB) -> $(OUTPUT_DIR)"
	$(BIN)/python -m trainer_pkg.train $(TRAIN_ARGS) --output_dir $(OUTPUT_DIR)
	$(BIN)/python -m trainer_pkg.evaluate $(OUTPUT_DIR)/model

# Two workers, one test file each at a time (a file's fixtures are built once), the longest files
# first (tests/conftest.py): most runs use one thread per process, so one worker alone leaves a
# core idle. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The inner loop: the tests marked fast (173 tests, about 1.5 minutes on the 2-core build machine).
test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m fast $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

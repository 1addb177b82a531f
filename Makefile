# Two commands do everything on a fresh machine:
#   make train   create .venv, install trainer_pkg, run the main job
#   make test    create .venv, install trainer_pkg with test extras, run the test suite
#
# The main job is the real one (pretrained mBERT fine-tuned on the full NSMC from the internet)
# unless ../shared holds the offline copies (NSMC files and the mBERT tokenizer/config, no
# weights): then it is the offline proxy, a 2-layer mBERT trained from scratch on the full corpus.
# Override with:  make train TRAIN_ARGS="--config configs/nsmc_mbert.yaml --output_dir runs/x"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
SHARED ?= ../shared
OUTPUT_DIR ?= runs/nsmc
BIN := $(VENV)/bin

ifneq ($(wildcard $(SHARED)/data/nsmc/ratings_train.txt),)
TRAIN_ARGS ?= --config configs/nsmc_proxy_offline.yaml --data $(SHARED)/data/nsmc \
	--model $(SHARED)/models/bert-base-multilingual-uncased --output_dir $(OUTPUT_DIR) --overwrite_output_dir
else
TRAIN_ARGS ?= --config configs/nsmc_mbert.yaml --output_dir $(OUTPUT_DIR) --overwrite_output_dir
endif

.PHONY: install train test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

train: install
	$(BIN)/python -m trainer_pkg.train $(TRAIN_ARGS)
	$(BIN)/python -m trainer_pkg.evaluate $(OUTPUT_DIR)/model

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

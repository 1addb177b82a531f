"""Integration with the real material in ../shared (the NSMC files and the mBERT tokenizer/config,
no weights). Skipped cleanly in a fresh clone without it."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_module


@pytest.fixture
def mbert(shared_dir):
    path = shared_dir / "models" / "bert-base-multilingual-uncased"
    if not (path / "vocab.txt").is_file():
        pytest.skip(f"no mBERT tokenizer under {path}")
    return path


def test_the_real_tokenizer_reproduces_the_original_ids(mbert):
    from trainer_pkg.model import load_tokenizer

    tokenizer = load_tokenizer(str(mbert))
    assert tokenizer("Transformers Is so COOL!!!")["input_ids"] == [101, 58263, 10127, 10297, 26462, 106, 106, 106, 102]
    assert tokenizer.is_fast


def test_full_nsmc_loads_with_every_row_and_empty_reviews_kept(shared_dir, mbert, tmp_path):
    from trainer_pkg.config import TrainConfig
    from trainer_pkg.data import column_values, load_tokenized
    from trainer_pkg.model import load_tokenizer

    config = TrainConfig(data=str(shared_dir / "data" / "nsmc"), model=str(mbert))
    splits, report = load_tokenized(config, load_tokenizer(str(mbert)))
    assert report.rows == {"validation": 5000, "train": 145_000, "test": 50_000}
    # The 7 empty reviews of the files (5 in train, 2 in test) fall where the seeded carve puts them.
    assert report.empty_texts == {"train": 5, "validation": 0, "test": 2}
    assert report.truncated_texts == {"train": 0, "validation": 0, "test": 0}
    assert sum(column_values(splits["test"], "labels")) == pytest.approx(25_000, rel=0.02)
    # Mean length matches the corpus statistics in ../shared/README.md (33.2 tokens).
    lengths = column_values(splits["train"], "length")
    assert 32.5 < sum(lengths) / len(lengths) < 34.0


@pytest.mark.slow
def test_proxy_run_on_real_data_trains_exports_and_evaluates(shared_dir, mbert, cache_env, tmp_path):
    output_dir = tmp_path / "proxy"
    run_module("trainer_pkg.train", "--config", REPO / "configs" / "nsmc_proxy_offline.yaml", "--data",
               shared_dir / "data" / "nsmc", "--model", mbert, "--max_train_samples", "4000",
               "--max_eval_samples", "1000", "--output_dir", output_dir, env=cache_env)
    summary = json.loads((output_dir / "metrics.json").read_text())
    assert summary["test"]["num_samples"] == 1000
    assert summary["test"]["accuracy"] > 0.6  # it learned something from 4,000 reviews
    run_module("trainer_pkg.evaluate", output_dir / "model", "--data", shared_dir / "data" / "nsmc",
               "--max_eval_samples", "1000", "--output", tmp_path / "eval.json", env=cache_env)
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"] == summary["test"]["accuracy"]

"""The train, validation and test splits of a run, tokenized."""

from __future__ import annotations

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from trainer_pkg.config import TrainConfig
from trainer_pkg.data.report import DataReport
from trainer_pkg.data.sources import (
    missing_split_error,
    source_files,
)
from trainer_pkg.data.table import (
    LABEL_HINT,
    check_and_clean,
    read_table,
    require_two_classes,
    resolve_columns_and_labels,
)
from trainer_pkg.data.tokenizing import count_rows_used, tokenize, truncation_length
from trainer_pkg.errors import UserError

SPLITS = ("train", "validation", "test")


def load_tokenized(config: TrainConfig, tokenizer: PreTrainedTokenizerBase, splits: tuple[str, ...] = SPLITS,
                   label_hint: str = LABEL_HINT) -> tuple[dict[str, Dataset], DataReport]:
    """The tokenized rows (with their texts) of each split in `splits` that the data has.

    Training asks for all three; evaluate for the one it scores, with a `label_hint` that names the
    model. The validation split is the validation file when there is one, else carved from train
    (seeded): the same rows whoever asks.
    """
    sources = source_files(config)
    training = "train" in splits
    if training and "train" not in sources:
        raise missing_split_error(config, "train")
    if "train" in sources:
        config = resolve_columns_and_labels(config)
    report = DataReport()
    max_length = truncation_length(config, tokenizer)
    carve = "validation" in splits and "validation" not in sources and bool(config.validation_size)
    tables = {}
    for split in SPLITS:
        if split in sources and (split in splits or (split == "train" and carve)):
            table = read_table(sources[split], split, config.cache_dir, report)
            tables[split] = check_and_clean(table, sources[split], config, split, report, label_hint)
    if training:
        require_two_classes(tables["train"], sources["train"], config)
    # Whole files are tokenized before the validation rows are carved, so their cache serves every
    # seed; with a sample limit only the rows kept are tokenized (carving picks the same rows either way).
    limited = bool(config.max_train_samples or config.max_eval_samples)
    if not limited:
        tables = {split: tokenize(table, tokenizer, max_length, split, report) for split, table in tables.items()}
    if carve:
        train = tables["train"]
        if config.validation_size >= len(train):
            raise UserError(
                f"{sources['train']}: validation_size {config.validation_size} leaves no training rows "
                f"({len(train)} rows); lower --validation_size, or give --validation_file"
            )
        parts = train.train_test_split(test_size=config.validation_size, seed=config.seed, shuffle=True)
        tables["train"], tables["validation"] = parts["train"], parts["test"]
        report.carved_validation = True
    result = {}
    for split in SPLITS:
        if split in splits and split in tables:
            rows = first_rows(tables[split], config.max_train_samples if split == "train" else config.max_eval_samples)
            tokenized = tokenize(rows, tokenizer, max_length, split, report) if limited else rows
            result[split] = count_rows_used(tokenized, split, config.labels, report)
            report.rows[split] = len(result[split])
    return result, report


def first_rows(table: Dataset, limit: int | None) -> Dataset:
    return table.select(range(min(limit, len(table)))) if limit else table

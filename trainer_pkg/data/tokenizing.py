"""Tokenization, cached by `datasets` under a fingerprint of the rows, the tokenizer and the length limit."""

from __future__ import annotations

import json
import os

from datasets import Dataset
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

from trainer_pkg.config import TrainConfig
from trainer_pkg.data.report import DataReport
from trainer_pkg.data.table import column_values

# Bump when the tokenized layout changes, so stale caches are not reused.
TOKENIZED_FORMAT_VERSION = 3


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase):
    """What determines the token ids: the full tokenizer definition (vocab, normalizer, ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return sorted(tokenizer.get_vocab().items())
    definition = json.loads(backend.to_str())
    # Truncation/padding settings change as a side effect of calls; they do not change the ids.
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return definition


def truncation_length(config: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """--max_length, else the tokenizer's limit; at most BERT's 512 positions (some tokenizers say 1e30)."""
    return config.max_length or min(tokenizer.model_max_length, 512)


def tokenize(table: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, split: str, report: DataReport) -> Dataset:
    """Tokenize once (batched, fast tokenizer) and cache on disk under a content fingerprint.

    Each row keeps its text (the report quotes it) and whether it was empty or cut, for
    count_rows_used to count once the rows a run uses are chosen."""
    # An explicit fingerprint: hashing the tokenizer object is unstable between runs (its
    # truncation state changes after the first call), which would defeat the cache.
    fingerprint = Hasher.hash([table._fingerprint, tokenizer_identity(tokenizer), max_length, TOKENIZED_FORMAT_VERSION])
    cache_file = table._get_cache_file_path(fingerprint) if table.cache_files else None
    report.tokenized_from_cache[split] = bool(cache_file and os.path.exists(cache_file))

    def encode(batch: dict) -> dict:
        encoded = tokenizer(batch["text"], truncation=True, max_length=max_length, return_token_type_ids=False)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        # Only texts that reach the limit can have been cut: re-count those without truncation.
        at_limit = [text for text, n in zip(batch["text"], encoded["length"]) if n == max_length]
        full = tokenizer(at_limit, add_special_tokens=True, return_attention_mask=False)["input_ids"] if at_limit else []
        cut = iter(len(ids) > max_length for ids in full)
        encoded["truncated"] = [n == max_length and next(cut) for n in encoded["length"]]
        encoded["empty_text"] = [not text.strip() for text in batch["text"]]
        return encoded

    return table.map(encode, batched=True, batch_size=2000, new_fingerprint=fingerprint)


def count_rows_used(dataset: Dataset, split: str, labels: list[str], report: DataReport) -> Dataset:
    """Count the handled problems (empty and cut texts, duplicate ids, absent classes) in the rows a
    run uses, after carving and sample limits; the dataset without tokenize's per-row flags."""
    report.empty_texts[split] = sum(column_values(dataset, "empty_text"))
    report.truncated_texts[split] = sum(column_values(dataset, "truncated"))
    if "id" in dataset.column_names:
        ids = column_values(dataset, "id")
        report.duplicate_ids[split] = len(ids) - len(set(ids))
    if "labels" in dataset.column_names:
        present = set(column_values(dataset, "labels"))
        report.missing_classes[split] = [name for i, name in enumerate(labels) if i not in present]
    return dataset.remove_columns(["empty_text", "truncated"])

"""Load, check, tokenize and batch the text-classification data.

Sources: the original NSMC TSVs (GitHub URLs, the default), a local directory holding
ratings_train.txt / ratings_test.txt, explicit TSV/CSV/JSONL files, or a hub dataset id.
Every file is read with `datasets` (so downloads and tokenization are cached on disk) and checked
row by row: an unknown label stops the run with the file and line; an empty text is kept as ""
and counted.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from trainer_pkg.config import TrainConfig
from trainer_pkg.errors import UserError
from trainer_pkg.network import require_download

NSMC_URLS = {
    "train": "https://raw.githubusercontent.com/e9t/nsmc/master/ratings_train.txt",
    "test": "https://raw.githubusercontent.com/e9t/nsmc/master/ratings_test.txt",
}
NSMC_COLUMNS = ["id", "document", "label"]
NSMC_FILES = {"train": "ratings_train.txt", "test": "ratings_test.txt"}
MODEL_COLUMNS = ["input_ids", "attention_mask", "labels"]
# Bump when the tokenized layout changes, so stale caches are not reused.
TOKENIZED_FORMAT_VERSION = 1

@dataclass
class DataReport:
    """What loading found, reported to the user and saved with the run."""

    rows: dict[str, int] = field(default_factory=dict)
    empty_texts: dict[str, int] = field(default_factory=dict)
    truncated_texts: dict[str, int] = field(default_factory=dict)
    tokenized_from_cache: dict[str, bool] = field(default_factory=dict)

    def lines(self) -> list[str]:
        lines = []
        for split, count in self.rows.items():
            notes = []
            if self.empty_texts.get(split):
                notes.append(f"{self.empty_texts[split]} empty texts kept")
            if self.truncated_texts.get(split):
                notes.append(f"{self.truncated_texts[split]} texts truncated")
            if self.tokenized_from_cache.get(split):
                notes.append("tokenized data from cache")
            lines.append(f"{split}: {count:,} rows" + (f" ({', '.join(notes)})" if notes else ""))
        return lines


def source_files(config: TrainConfig) -> dict[str, str]:
    """Where each split comes from: a local path or a URL ('hub:ID' for a hub dataset)."""
    explicit = {split: path for split, path in (("train", config.train_file), ("test", config.test_file)) if path}
    if len(explicit) == 2:
        return explicit
    if config.data == "nsmc":
        sources = dict(NSMC_URLS)
    elif Path(config.data).is_dir():
        sources = {split: str(Path(config.data) / name) for split, name in NSMC_FILES.items()}
    elif config.data.startswith((".", "/", "~")) or config.data.count("/") > 1:
        raise UserError(
            f"--data {config.data}: no such directory (expected a directory holding "
            "ratings_train.txt and ratings_test.txt, 'nsmc', or a hub dataset id)"
        )
    else:
        sources = {split: f"hub:{config.data}" for split in ("train", "test")}
    return {**sources, **explicit}


def _is_remote(source: str) -> bool:
    return source.startswith(("http://", "https://", "hub:"))


def _offline_hint(source: str) -> str:
    return f"cannot download {source.removeprefix('hub:')} (no network or hub unreachable): {LOCAL_DATA_HINT}"


def _download_cached(source: str, cache_dir: str | None) -> bool:
    """Whether a previous run already downloaded this URL (datasets then works offline)."""
    if source.startswith("hub:"):
        return False
    root = Path(cache_dir) if cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
    downloads = root / "downloads"
    if not downloads.is_dir():
        return False
    return any(source in meta.read_text(errors="ignore") for meta in downloads.glob("*.json"))


LOCAL_DATA_HINT = (
    "pass --data DIR (a directory holding ratings_train.txt and ratings_test.txt) "
    "or --train_file/--test_file with local files"
)


def read_table(source: str, split: str, cache_dir: str | None = None) -> Dataset:
    """Read one file (or URL, or hub split) as a Dataset of strings, with clear errors."""
    if _is_remote(source) and not _download_cached(source, cache_dir):
        require_download(f"the {split} data", source.removeprefix("hub:"), LOCAL_DATA_HINT)
    if source.startswith("hub:"):
        try:
            return datasets.load_dataset(source[4:], split=split, cache_dir=cache_dir)
        except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as error:
            raise UserError(_offline_hint(source) + f" [{type(error).__name__}]") from None
    if not _is_remote(source):
        path = Path(source)
        if not path.is_file():
            raise UserError(f"{split} file not found: {source}")
        if path.stat().st_size == 0:
            raise UserError(f"{source}: file is empty (expected a header line and rows)")
    suffix = Path(source.split("?")[0]).suffix.lower()
    if suffix in (".json", ".jsonl"):
        builder, options = "json", {}
    else:
        # NSMC texts contain quote characters: quoting must be off, and empty reviews must stay
        # "" rather than NaN; the utf-8-sig encoding drops a byte-order mark from the header.
        delimiter = "," if suffix == ".csv" else "\t"
        builder = "csv"
        options = dict(delimiter=delimiter, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
        if delimiter == "\t":
            options["quoting"] = csv.QUOTE_NONE
        if not _is_remote(source):
            options["features"] = _all_strings(_header(Path(source), delimiter))
        elif source in NSMC_URLS.values():
            options["features"] = _all_strings(NSMC_COLUMNS)
    try:
        return datasets.load_dataset(builder, data_files={split: source}, split=split, cache_dir=cache_dir, **options)
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error
        message = " ".join(str(cause).split())
        raise UserError(f"{source}: cannot parse as {builder.upper()}: {message}") from None
    except (ConnectionError, TimeoutError) as error:
        raise UserError(_offline_hint(source) + f" [{type(error).__name__}]") from None
    except OSError as error:
        if _is_remote(source):
            raise UserError(_offline_hint(source) + f" [{type(error).__name__}]") from None
        raise UserError(f"{source}: cannot read: {error}") from None


def _header(path: Path, delimiter: str) -> list[str]:
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as file:
        first = file.readline().rstrip("\r\n")
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    names = next(csv.reader([first], delimiter=delimiter, quoting=quoting), [])
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"{path} line 1: duplicate column names {duplicates}")
    return names


def _all_strings(names: list[str]) -> datasets.Features:
    # Every column as text: a per-chunk type guess (a column of digits in the first 10k rows,
    # text later) would otherwise fail half-way through a large file.
    return datasets.Features({name: datasets.Value("string") for name in names})


def label_ids(values: list, names: list[str]) -> tuple[list[int], int | None]:
    """Map labels given as ids (0, '1') or names ('positive') to ids; also the first bad position."""
    lookup = {name: i for i, name in enumerate(names)}
    lookup.update({str(i): i for i in range(len(names))})
    ids = []
    for position, value in enumerate(values):
        label = lookup.get(str(value).strip()) if value is not None and not isinstance(value, bool) else None
        if label is None and isinstance(value, float) and value.is_integer():
            label = lookup.get(str(int(value)))
        if label is None:
            return ids, position
        ids.append(label)
    return ids, None


def check_and_clean(table: Dataset, source: str, config: TrainConfig, split: str, report: DataReport) -> Dataset:
    """Check columns and labels; normalise texts to strings and labels to ids."""
    columns = table.column_names
    for role, column in (("text", config.text_column), ("label", config.label_column)):
        if column not in columns:
            flag = f"--{role}_column"
            raise UserError(
                f"{source}: no {role} column {column!r} (columns: {', '.join(columns)}); "
                f"pass {flag} NAME or fix the header"
            )
    first_data_line = 1 if source.lower().endswith((".json", ".jsonl")) else 2
    # Only these values go into the closure: datasets fingerprints the function with what it
    # captures, and capturing the whole config would re-tokenize whenever any setting changed.
    text_column, label_column, labels = config.text_column, config.label_column, list(config.labels)

    def clean(batch: dict, indices: list[int]) -> dict:
        ids, bad = label_ids(batch[label_column], labels)
        if bad is not None:
            line = indices[bad] + first_data_line
            raise UserError(
                f"{source} line {line}: label {batch[label_column][bad]!r} is not one of "
                f"{list(range(len(labels)))} or {labels}; fix the row or pass --labels"
            )
        texts = ["" if text is None else str(text) for text in batch[text_column]]
        return {"text": texts, "labels": ids}

    keep = [config.id_column] if config.id_column in columns else []
    cleaned = table.map(
        clean, batched=True, with_indices=True, batch_size=10_000,
        remove_columns=[c for c in columns if c not in keep],
    )
    if keep and config.id_column != "id":
        cleaned = cleaned.rename_column(config.id_column, "id")
    report.empty_texts[split] = sum(1 for text in cleaned["text"] if not text.strip())
    return cleaned


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


def tokenize(table: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, split: str, report: DataReport) -> Dataset:
    """Tokenize once (batched, fast tokenizer) and cache on disk under a content fingerprint."""
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
        return encoded

    tokenized = table.map(encode, batched=True, batch_size=2000, new_fingerprint=fingerprint,
                          remove_columns=["text"])
    report.truncated_texts[split] = sum(tokenized["truncated"])
    return tokenized.remove_columns("truncated")


def texts_dataset(source: str, text_column: str, id_column: str, cache_dir: str | None = None) -> Dataset:
    """Rows to predict from a TSV/CSV/JSONL file ('-' reads one text per line from stdin)."""
    if source == "-":
        texts = [line.rstrip("\r\n") for line in sys.stdin]
        return Dataset.from_dict({"text": texts})
    table = read_table(source, "predict", cache_dir)
    if text_column not in table.column_names:
        raise UserError(
            f"{source}: no text column {text_column!r} (columns: {', '.join(table.column_names)}); "
            "pass --text_column NAME"
        )
    keep = [c for c in (text_column, id_column) if c in table.column_names]
    table = table.select_columns(keep).rename_column(text_column, "text")
    if id_column in keep and id_column != "id":
        table = table.rename_column(id_column, "id")
    return table.map(lambda b: {"text": ["" if t is None else str(t) for t in b["text"]]}, batched=True)


def load_tokenized(
    config: TrainConfig, tokenizer: PreTrainedTokenizerBase, splits=("train", "test")
) -> tuple[dict[str, Dataset], DataReport]:
    """The tokenized train/validation/test splits (validation carved from train, seeded)."""
    report = DataReport()
    max_length = config.max_length or min(tokenizer.model_max_length, 512)
    sources = source_files(config)
    tokenized = {}
    for split in splits:
        table = read_table(sources[split], split, config.cache_dir)
        table = check_and_clean(table, sources[split], config, split, report)
        tokenized[split] = tokenize(table, tokenizer, max_length, split, report)
    result = {}
    if "train" in tokenized:
        train = tokenized["train"]
        if config.validation_size:
            if config.validation_size >= len(train):
                raise UserError(
                    f"{sources['train']}: validation_size {config.validation_size} leaves no training rows "
                    f"({len(train)} rows); lower --validation_size"
                )
            parts = train.train_test_split(test_size=config.validation_size, seed=config.seed, shuffle=True)
            train, result["validation"] = parts["train"], parts["test"]
        if config.max_train_samples:
            train = train.select(range(min(config.max_train_samples, len(train))))
        result["train"] = train
    if "test" in tokenized:
        result["test"] = tokenized["test"]
    if config.max_eval_samples:
        for split in ("validation", "test"):
            if split in result:
                result[split] = result[split].select(range(min(config.max_eval_samples, len(result[split]))))
    for split in result:
        report.rows[split] = len(result[split])
    return result, report


class LengthGroupedSampler(Sampler[int]):
    """Random order, but consecutive batches of similar length.

    Shuffle all indices, cut them into mega-batches of `group` batches, sort each mega-batch by
    length, cut it into batches, shuffle the batches. Only the last batch may be short, and it
    stays last so a DataLoader with the same batch_size cuts exactly these batches.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group: int = 50):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group = group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        # Mixed so that (seed, epoch + 1) never replays (seed + 1, epoch).
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        mega = self.batch_size * self.group
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=self.lengths.__getitem__, reverse=True)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        for batch in shuffled + tail:
            yield from batch


def collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorWithPadding:
    # Multiples of 8 keep tensor-core shapes on GPU and bound the number of distinct shapes.
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8, return_tensors="pt")


def train_dataloader(dataset: Dataset, tokenizer, config: TrainConfig) -> DataLoader:
    lengths = dataset["length"]
    model_inputs = dataset.select_columns(MODEL_COLUMNS)
    if config.group_by_length:
        sampler = LengthGroupedSampler(lengths, config.per_device_batch_size, config.seed)
    else:
        sampler = torch.utils.data.RandomSampler(model_inputs, generator=torch.Generator().manual_seed(config.seed))
    # A private generator: creating an iterator draws a seed from it, and drawing from the global
    # RNG instead would shift every later dropout mask after a resume.
    return DataLoader(
        model_inputs, batch_size=config.per_device_batch_size, sampler=sampler, collate_fn=collator(tokenizer),
        num_workers=config.num_workers, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(config.seed),
    )


def eval_dataloader(dataset: Dataset, tokenizer, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches sorted by length, shortest first: least padding, and exact sharding.

    Under several processes Accelerate completes the last round with rows from the first
    batches. Shortest first, those rows never lengthen the padded batch they join, so every row
    is computed in the same padded shape, and gets the same logits, on any number of processes.
    Each batch carries `row`, the example's position in `dataset`, so gathered predictions can
    be put back in input order.
    """
    lengths = dataset["length"]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    columns = [c for c in MODEL_COLUMNS if c in dataset.column_names]
    rows = dataset.select_columns(columns).add_column("row", list(range(len(dataset))))
    return DataLoader(
        rows, batch_size=batch_size, sampler=order, collate_fn=collator(tokenizer),
        num_workers=num_workers, pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
    )


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    return math.ceil(num_batches / grad_accum)

"""Load, check, tokenize and batch the text-classification data.

Sources (trainer_pkg/data_sources.py): the original NSMC TSVs (GitHub URLs, the default), a local
directory of train/validation/test files, explicit TSV/CSV/JSONL files, or a hub dataset id.
Every file is read with `datasets` (so downloads and tokenization are cached on disk) and checked
row by row: an unknown label stops the run with the file and line; an empty text is kept as ""
and counted. Local files are first scanned line by line (`scan_local_file`) for what the parsers
report without a line number or not at all. README "Bad input" lists every case and its outcome.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from trainer_pkg.config import TrainConfig
from trainer_pkg.data_sources import NSMC_LABELS, NSMC_URLS, is_nsmc, missing_split_error, source_files
from trainer_pkg.errors import UserError
from trainer_pkg.network import require_download

NSMC_COLUMNS = ["id", "document", "label"]
# Bump when the tokenized layout changes, so stale caches are not reused.
TOKENIZED_FORMAT_VERSION = 1

@dataclass
class DataReport:
    """What loading found, reported to the user and saved with the run."""

    rows: dict[str, int] = field(default_factory=dict)
    empty_texts: dict[str, int] = field(default_factory=dict)
    truncated_texts: dict[str, int] = field(default_factory=dict)
    tokenized_from_cache: dict[str, bool] = field(default_factory=dict)
    duplicate_ids: dict[str, int] = field(default_factory=dict)
    blank_lines: dict[str, int] = field(default_factory=dict)
    ignored_columns: dict[str, list[str]] = field(default_factory=dict)
    missing_classes: dict[str, list[str]] = field(default_factory=dict)
    carved_validation: bool = False

    def lines(self) -> list[str]:
        lines = []
        # The validation split is carved from the training file: its file-level notes are train's.
        for split, count in self.rows.items():
            counted = (("empty_texts", "empty texts kept"), ("truncated_texts", "texts truncated"),
                       ("duplicate_ids", "duplicate ids kept"), ("blank_lines", "blank lines skipped"))
            notes = ["carved from train"] if split == "validation" and self.carved_validation else []
            notes += [f"{getattr(self, name)[split]} {what}" for name, what in counted if getattr(self, name).get(split)]
            if self.ignored_columns.get(split):
                notes.append(f"columns ignored: {', '.join(self.ignored_columns[split])}")
            if self.missing_classes.get(split):
                notes.append(f"no rows of class {', '.join(map(repr, self.missing_classes[split]))}")
            if self.tokenized_from_cache.get(split):
                notes.append("tokenized data from cache")
            lines.append(f"{split}: {count:,} rows" + (f" ({', '.join(notes)})" if notes else ""))
        return lines

    def counts(self) -> dict:
        """The handled problems, per split, for log.jsonl and metrics.json."""
        return {"rows": self.rows, "empty_texts": self.empty_texts, "truncated_texts": self.truncated_texts,
                "duplicate_ids": self.duplicate_ids, "blank_lines": self.blank_lines,
                "ignored_columns": self.ignored_columns, "missing_classes": self.missing_classes}


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
    "pass --data DIR (a directory of train/validation/test files, or NSMC's ratings_train.txt and "
    "ratings_test.txt) or --train_file/--test_file with local files"
)


UTF8_HINT = "save it as UTF-8 (a CP949/EUC-KR file converts with: iconv -f cp949 -t utf-8 IN > OUT)"


@dataclass
class FileScan:
    data_rows: int = 0
    blank_lines: int = 0


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without the line ending) of a local file, stopping at bytes that are not UTF-8."""
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                bad = raw[error.start:error.start + 1].hex()
                raise UserError(f"{path} line {number}: byte {error.start + 1} (0x{bad}) is not UTF-8; {UTF8_HINT}") from None
            yield number, text.removesuffix("\n").removesuffix("\r")


def scan_local_file(path: Path, kind: str, delimiter: str = "\t") -> FileScan:
    """One pass over a local file for the problems the parsers report without a line, or not at all.

    Not UTF-8 (pandas names a byte offset, pyarrow a buffer position); a row with more or fewer
    fields than the header (a tab or a newline inside a TSV text: pandas would shift the row or
    blame its label); a carriage return inside a field (pandas ends the row there); a JSON line
    that does not parse. Blank lines are counted: the parsers skip them.
    """
    scan = FileScan()
    if kind == "json":
        # A .json file may hold one array over many lines: only its encoding is checked here.
        per_line = path.suffix.lower() == ".jsonl"
        for number, text in _decoded_lines(path):
            if not text.strip():
                scan.blank_lines += 1
                continue
            scan.data_rows += 1
            if not per_line:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise UserError(f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno}); "
                                "JSONL needs one complete object per line") from None
            if not isinstance(record, dict):
                raise UserError(f"{path} line {number}: expected a JSON object per line, got {type(record).__name__}")
        return scan
    lines = _decoded_lines(path)
    header = next(lines, (1, ""))[1]
    expected = len(_split_fields(header, delimiter))
    trailing_blank = 0
    for number, text in lines:
        if not text:
            trailing_blank += 1
            continue
        # A blank line followed by more rows is counted; blank lines at the end are just the file's end.
        scan.blank_lines, trailing_blank = scan.blank_lines + trailing_blank, 0
        if "\r" in text:
            raise UserError(f"{path} line {number}: a carriage return (\\r) inside a field ends the row early; "
                            "remove it from the text")
        if delimiter == "," and '"' in text:
            # A quoted CSV field may hold the delimiter or span lines: leave those rows to the CSV parser.
            scan.data_rows += 1
            continue
        found = len(_split_fields(text, delimiter))
        if found != expected:
            cause = "a tab inside a text" if found > expected else "a line break inside a text, or a missing field"
            name = "tab" if delimiter == "\t" else "comma"
            raise UserError(f"{path} line {number}: {found} {name}-separated fields, the header has {expected} "
                            f"({cause}?); fix the row")
        scan.data_rows += 1
    return scan


def _split_fields(line: str, delimiter: str) -> list[str]:
    if delimiter == "\t":
        return line.split("\t")
    return next(csv.reader([line], delimiter=delimiter), [])


def line_of_row(source: str, index: int) -> int:
    """The line of data row `index` (0-based) in a local file, counting the header and blank lines.

    The parsers skip blank lines, so row index + 2 can be wrong. Only called to word an error:
    reading the file again costs nothing that matters then.
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        # A quoted field may span lines: let the csv module count them.
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as file:
            reader = csv.reader(file)
            next(reader, None)
            previous_end = reader.line_num
            for row_index, row in enumerate(row for row in reader if row):
                if row_index == index:
                    return previous_end + 1
                previous_end = reader.line_num
        return index + 2
    json_file = suffix in (".json", ".jsonl")
    rows_seen = 0 if json_file else -1  # a TSV's first line is the header, not a row
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            if not (raw.strip() if json_file else raw.rstrip(b"\r\n")):
                continue
            if rows_seen == index:
                return number
            rows_seen += 1
    return index + (1 if json_file else 2)


def read_table(source: str, split: str, cache_dir: str | None = None, report: DataReport | None = None) -> Dataset:
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
        if path.is_dir():
            raise UserError(f"{split} file {source} is a directory; pass a TSV/CSV/JSONL file")
        if not path.is_file():
            raise UserError(f"{split} file not found: {source}")
        if path.stat().st_size == 0:
            raise UserError(f"{source}: file is empty (expected a header line and rows)")
    suffix = Path(source.split("?")[0]).suffix.lower()
    if not _is_remote(source):
        kind = "json" if suffix in (".json", ".jsonl") else "csv"
        scan = scan_local_file(path, kind, "," if suffix == ".csv" else "\t")
        if scan.data_rows == 0:
            raise UserError(f"{source}: no data rows" + ("" if kind == "json" else " (only a header line)"))
        if report is not None:
            report.blank_lines[split] = scan.blank_lines
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
    except ValueError as error:
        # pyarrow's and pandas' parse errors (ArrowInvalid is a ValueError) name no line: the
        # scan above catches what it can; anything else still gets one line, not a traceback.
        if _is_remote(source):
            raise
        raise UserError(f"{source}: cannot parse as {builder.upper()}: {' '.join(str(error).split())[:300]}") from None
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
    # Ids stand for classes only when no class is named by a number: with names "1".."5" (star
    # ratings), "1" is the first class, not id 1.
    numbered = any(name.strip().lstrip("-").isdigit() for name in names)
    lookup = {} if numbered else {str(i): i for i in range(len(names))}
    lookup.update({name: i for i, name in enumerate(names)})
    ids = []
    for position, value in enumerate(values):
        label = lookup.get(str(value).strip()) if value is not None and not isinstance(value, bool) else None
        if label is None and isinstance(value, float) and value.is_integer():
            label = lookup.get(str(int(value)))
        if label is None:
            return ids, position
        ids.append(label)
    return ids, None


LABEL_HINT = "fix the row or pass --labels"


def column_values(dataset: Dataset, name: str) -> list:
    """A whole column in row order, in one Arrow read (`dataset[name]` formats row by row: ~100x slower)."""
    return dataset.with_format("arrow")[name].to_pylist()


# A column by one of these names holds the text when the columns alone leave it open.
TEXT_COLUMN_NAMES = ("text", "sentence", "document", "review", "content", "comment")


def _shown_columns(columns: list[str]) -> str:
    return ", ".join(name if len(name) <= 30 else name[:27] + "..." for name in columns)


def find_text_column(table: Dataset, source: str, text_column: str | None, not_text: set[str]) -> str:
    """`text_column` when given, else the one text column there is: the only string column besides
    `not_text` (the label and id columns), else the only one named like a text (TEXT_COLUMN_NAMES)."""
    if text_column:
        return text_column
    candidates = [name for name, feature in table.features.items() if name not in not_text
                  and getattr(feature, "dtype", None) in ("string", "large_string")]
    if len(candidates) == 1:
        return candidates[0]
    named = [name for name in candidates if name.lower() in TEXT_COLUMN_NAMES]
    if len(named) == 1:
        return named[0]
    found = f"text columns {_shown_columns(candidates)}" if candidates else "no text column"
    raise UserError(f"{source}: cannot tell which column holds the text ({found}; all columns: "
                    f"{_shown_columns(table.column_names)}); pass --text_column NAME")


def require_label_column(table: Dataset, source: str, config: TrainConfig) -> None:
    columns = table.column_names
    if config.label_column in columns:
        return
    tabular = not source.lower().endswith((".json", ".jsonl"))
    # A first line of data instead of names holds neither the text column nor any usual name of one.
    if config.text_column:
        no_header = tabular and config.text_column not in columns
    else:
        no_header = tabular and not any(name.lower() in TEXT_COLUMN_NAMES for name in columns)
    raise UserError(
        f"{source}{' line 1' if tabular else ''}: no label column {config.label_column!r} (columns: "
        f"{_shown_columns(columns)}); "
        + ("the first line must be a header naming the columns" if no_header else "pass --label_column NAME or fix the header")
    )


def infer_labels(table: Dataset, source: str, config: TrainConfig) -> list[str]:
    """The class names of the training labels: ids 0..K-1 named "0".."K-1", other numbers in numeric
    order, names sorted; a hub dataset's ClassLabel names as they are."""
    feature = table.features[config.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = {str(value).strip() for value in column_values(table, config.label_column)
              if value is not None and not isinstance(value, bool) and str(value).strip()}
    # JSON numbers arrive as floats when one row has a fraction: 1.0 is the class 1.
    values = {value[:-2] if value.endswith(".0") and value[:-2].lstrip("-").isdigit() else value for value in values}
    if len(values) < 2:
        shown = f"only {next(iter(values))!r}" if values else "none"
        raise UserError(f"{source}: the {config.label_column!r} column holds {shown} as labels; training needs at "
                        "least two classes: check the file and --label_column, or pass --labels")
    if all(value.lstrip("-").isdigit() for value in values):
        return [str(number) for number in sorted(int(value) for value in values)]
    return sorted(values)


def resolve_columns_and_labels(config: TrainConfig) -> TrainConfig:
    """The config with --text_column and --labels filled from the training data where not given."""
    if config.text_column is not None and config.labels is not None:
        return config
    sources = source_files(config)
    if "train" not in sources:
        raise missing_split_error(config, "train")
    table = read_table(sources["train"], "train", config.cache_dir)
    require_label_column(table, sources["train"], config)
    text_column = find_text_column(table, sources["train"], config.text_column, {config.label_column, config.id_column})
    if config.labels is not None:
        labels = config.labels
    else:
        labels = NSMC_LABELS if is_nsmc(config) else infer_labels(table, sources["train"], config)
    return dataclasses.replace(config, text_column=text_column, labels=labels)


def check_and_clean(table: Dataset, source: str, config: TrainConfig, split: str, report: DataReport,
                    label_hint: str = LABEL_HINT) -> Dataset:
    """Check columns and labels; normalise texts to strings and labels to ids."""
    columns = table.column_names
    tabular = not source.lower().endswith((".json", ".jsonl"))
    require_label_column(table, source, config)
    text_column = find_text_column(table, source, config.text_column, {config.label_column, config.id_column})
    if text_column not in columns:
        raise UserError(f"{source}{' line 1' if tabular else ''}: no text column {text_column!r} (columns: "
                        f"{_shown_columns(columns)}); pass --text_column NAME or fix the header")
    first_data_line = 1 if not tabular else 2
    # Only these values go into the closure: datasets fingerprints the function with what it
    # captures, and capturing the whole config would re-tokenize whenever any setting changed.
    label_column, labels = config.label_column, list(config.labels)

    def clean(batch: dict, indices: list[int]) -> dict:
        ids, bad = label_ids(batch[label_column], labels)
        if bad is not None:
            value = batch[label_column][bad]
            try:
                line = line_of_row(source, indices[bad]) if Path(source).is_file() else indices[bad] + first_data_line
            except OSError:
                line = indices[bad] + first_data_line
            expected = f"{list(range(len(labels)))} or {labels}"
            if value is None or str(value).strip() == "":
                raise UserError(f"{source} line {line}: the label is empty (expected one of {expected}); {label_hint}")
            raise UserError(f"{source} line {line}: label {value!r} is not one of {expected}; {label_hint}")
        texts = ["" if text is None else str(text) for text in batch[text_column]]
        return {"text": texts, "labels": ids}

    keep = [config.id_column] if config.id_column in columns else []
    cleaned = table.map(
        clean, batched=True, with_indices=True, batch_size=10_000,
        remove_columns=[c for c in columns if c not in keep],
    )
    if keep and config.id_column != "id":
        cleaned = cleaned.rename_column(config.id_column, "id")
    report.empty_texts[split] = sum(1 for text in column_values(cleaned, "text") if not text.strip())
    count_handled_problems(cleaned, columns, config, text_column, split, report)
    return cleaned


def count_handled_problems(cleaned: Dataset, columns: list[str], config: TrainConfig, text_column: str, split: str,
                           report: DataReport) -> None:
    """Duplicate ids, ignored columns and absent classes: kept, counted and reported, not errors."""
    if "id" in cleaned.column_names:
        ids = column_values(cleaned, "id")
        report.duplicate_ids[split] = len(ids) - len(set(ids))
    used = {text_column, config.label_column, config.id_column}
    report.ignored_columns[split] = [c for c in columns if c not in used]
    present = set(column_values(cleaned, "labels"))
    report.missing_classes[split] = [name for i, name in enumerate(config.labels) if i not in present]


def require_two_classes(cleaned: Dataset, source: str, config: TrainConfig) -> None:
    """A training file with one class trains a constant predictor: stop instead of reporting it."""
    present = sorted(set(column_values(cleaned, "labels")))
    if len(present) == 1:
        raise UserError(
            f"{source}: every row has label {config.labels[present[0]]!r} ({len(cleaned):,} rows); training needs "
            f"at least two of {config.labels}: check the file, --label_column and --labels"
        )


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


def texts_dataset(source: str, text_column: str | None, id_column: str, cache_dir: str | None = None) -> Dataset:
    """Rows to predict from a TSV/CSV/JSONL file (stdin is streamed by trainer_pkg.predict itself)."""
    table = read_table(source, "predict", cache_dir)
    text_column = find_text_column(table, source, text_column, {id_column, "label"})
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


def load_tokenized(config: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[dict[str, Dataset], DataReport]:
    """The tokenized train, validation and (when there is one) test splits.

    The validation split is the validation file when there is one, else carved from train (seeded).
    """
    config = resolve_columns_and_labels(config)
    report = DataReport()
    max_length = config.max_length or min(tokenizer.model_max_length, 512)
    sources = source_files(config)
    if "train" not in sources:
        raise missing_split_error(config, "train")
    result = {}
    for split in ("train", "validation", "test"):
        if split not in sources:
            continue
        table = read_table(sources[split], split, config.cache_dir, report)
        table = check_and_clean(table, sources[split], config, split, report)
        if split == "train":
            require_two_classes(table, sources[split], config)
        result[split] = tokenize(table, tokenizer, max_length, split, report)
    train = result["train"]
    if "validation" not in result and config.validation_size:
        if config.validation_size >= len(train):
            raise UserError(
                f"{sources['train']}: validation_size {config.validation_size} leaves no training rows "
                f"({len(train)} rows); lower --validation_size, or give --validation_file"
            )
        parts = train.train_test_split(test_size=config.validation_size, seed=config.seed, shuffle=True)
        train, result["validation"] = parts["train"], parts["test"]
        report.carved_validation = True
    if config.max_train_samples:
        train = train.select(range(min(config.max_train_samples, len(train))))
    result["train"] = train
    if config.max_eval_samples:
        for split in ("validation", "test"):
            if split in result:
                result[split] = result[split].select(range(min(config.max_eval_samples, len(result[split]))))
    for split in ("train", "validation", "test"):
        if split in result:
            report.rows[split] = len(result[split])
    return result, report


def length_grouped_batches(lengths: list[int], seed: int, epoch: int, chunk_rows: int,
                           cut: Callable[[list[int]], list[list[int]]], short_tail_last: bool = False) -> list[list[int]]:
    """Random order, but batches of similar length: shuffle all indices, sort each chunk of
    `chunk_rows` longest first, `cut` it into batches, shuffle the batches. A function of
    (seed, epoch) alone, so `skip_first_batches` resumes exactly."""
    # Mixed so that (seed, epoch + 1) never replays (seed + 1, epoch).
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk_rows):
        batches += cut(sorted(order[start:start + chunk_rows], key=lengths.__getitem__, reverse=True))
    tail = [batches.pop()] if short_tail_last and batches and len(batches[-1]) < len(batches[0]) else []
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + tail


class LengthGroupedSampler(Sampler[int]):
    """Row indices in length_grouped_batches order, in batches of `batch_size` rows.

    Only the last batch may be short, and it stays last so a DataLoader with the same batch_size
    cuts exactly these batches.
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
        size = self.batch_size
        for batch in length_grouped_batches(self.lengths, self.seed, self.epoch, size * self.group,
                                            lambda chunk: [chunk[i:i + size] for i in range(0, len(chunk), size)],
                                            short_tail_last=True):
            yield from batch


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches holding at most `max_tokens` padded tokens each: many short texts or a few long ones.

    length_grouped_batches, with a batch growing while (rows + 1) x its padded length fits the
    budget. Lengths are counted padded as the collator pads them (to a multiple of `pad_to_multiple_of`).
    """

    def __init__(self, lengths: list[int], max_tokens: int, seed: int, group_rows: int = 8192,
                 pad_to_multiple_of: int = 8):
        self.lengths = lengths
        self.max_tokens = max_tokens
        self.multiple = pad_to_multiple_of
        self.seed = seed
        self.group_rows = group_rows
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches = length_grouped_batches(self.lengths, self.seed, epoch, self.group_rows, self._cut)

    def _cut(self, chunk: list[int]) -> list[list[int]]:
        batches: list[list[int]] = []
        batch: list[int] = []
        for index in chunk:
            # Longest first, so the first row of a batch fixes its padded length.
            width = -(-self.lengths[batch[0] if batch else index] // self.multiple) * self.multiple
            if batch and (len(batch) + 1) * width > self.max_tokens:
                batches.append(batch)
                batch = []
            batch.append(index)
        return batches + [batch]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


class PackedTokens(torch.utils.data.Dataset):
    """The tokenized rows as flat numpy arrays; a batch is one gather-and-pad, not B Arrow reads.

    Fetching rows one by one from an Arrow-backed `datasets.Dataset` and padding them with
    DataCollatorWithPadding cost ~75 ms per batch of 64 here: it capped a GPU run at ~1,600
    samples/s. The sampler still yields row indices (so samplers, sharding and
    skip_first_batches work unchanged); `collate` builds the padded tensors in one pass.
    """

    def __init__(self, dataset: Dataset, pad_token_id: int, with_row: bool = False, pad_to_multiple_of: int = 8):
        table = dataset.with_format("arrow")[:]  # rows in order, after any select/split
        ids = table.column("input_ids").combine_chunks()
        offsets = ids.offsets.to_numpy()
        self.token_ids = ids.values.to_numpy()[offsets[0]:offsets[-1]].astype(np.int64)
        self.starts = offsets[:-1] - offsets[0]
        self.lengths = np.diff(offsets)
        self.labels = table.column("labels").to_numpy() if "labels" in table.column_names else None
        self.pad_token_id = pad_token_id
        self.with_row = with_row
        self.multiple = pad_to_multiple_of

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[rows]
        width = int(-(-lengths.max() // self.multiple) * self.multiple)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        for position, (start, length) in enumerate(zip(self.starts[rows], lengths)):
            input_ids[position, :length] = self.token_ids[start:start + length]
        batch = {"input_ids": torch.from_numpy(input_ids),
                 "attention_mask": torch.from_numpy((np.arange(width) < lengths[:, None]).astype(np.int64))}
        if self.labels is not None:
            batch["labels"] = torch.from_numpy(self.labels[rows].astype(np.int64))
        if self.with_row:
            batch["row"] = torch.from_numpy(rows)
        return batch


def pad_multiple() -> int:
    """Multiples of 8 keep tensor-core shapes on a GPU (and bound the number of distinct shapes); on the
    CPU every padded position is wasted arithmetic: benchmarks/padding.py measured both (docs/performance.md)."""
    return 8 if torch.cuda.is_available() else 1


def train_dataloader(dataset: Dataset, tokenizer, config: TrainConfig) -> DataLoader:
    packed = PackedTokens(dataset, tokenizer.pad_token_id, pad_to_multiple_of=pad_multiple())
    lengths = packed.lengths.tolist()
    # A private generator: creating an iterator draws a seed from it, and drawing from the global
    # RNG instead would shift every later dropout mask after a resume.
    loading = dict(collate_fn=packed.collate, num_workers=config.num_workers, pin_memory=torch.cuda.is_available(),
                   generator=torch.Generator().manual_seed(config.seed))
    if config.max_tokens_per_batch:
        return DataLoader(packed, batch_sampler=TokenBudgetBatchSampler(lengths, config.max_tokens_per_batch, config.seed,
                                                                        pad_to_multiple_of=pad_multiple()), **loading)
    if config.group_by_length:
        sampler = LengthGroupedSampler(lengths, config.per_device_batch_size, config.seed)
    else:
        sampler = torch.utils.data.RandomSampler(packed, generator=torch.Generator().manual_seed(config.seed))
    return DataLoader(packed, batch_size=config.per_device_batch_size, sampler=sampler, **loading)


def eval_dataloader(dataset: Dataset, tokenizer, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches sorted by length, shortest first: least padding, and exact sharding.

    Under several processes Accelerate completes the last round with rows from the first
    batches. Shortest first, those rows never lengthen the padded batch they join, so every row
    is computed in the same padded shape, and gets the same logits, on any number of processes.
    Each batch carries `row`, the example's position in `dataset`, so gathered predictions can
    be put back in input order.
    """
    packed = PackedTokens(dataset, tokenizer.pad_token_id, with_row=True, pad_to_multiple_of=pad_multiple())
    order = np.argsort(packed.lengths, kind="stable").tolist()
    return DataLoader(
        packed, batch_size=batch_size, sampler=order, collate_fn=packed.collate,
        num_workers=num_workers, pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
    )


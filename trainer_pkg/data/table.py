"""One file as a checked table: read with `datasets`, the text and label columns found, labels as ids."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import datasets
from datasets import Dataset

from trainer_pkg.config import TrainConfig
from trainer_pkg.data.report import DataReport
from trainer_pkg.data.scan import line_of_row, scan_local_file
from trainer_pkg.data.sources import (
    LOCAL_DATA_HINT,
    NSMC_LABELS,
    NSMC_URLS,
    download_cached,
    is_nsmc,
    is_remote,
    missing_split_error,
    offline_hint,
    source_files,
)
from trainer_pkg.errors import UserError
from trainer_pkg.network import require_download

NSMC_COLUMNS = ["id", "document", "label"]


def read_table(source: str, split: str, cache_dir: str | None = None, report: DataReport | None = None) -> Dataset:
    """Read one file (or URL, or hub split) as a Dataset of strings, with clear errors."""
    if is_remote(source) and not download_cached(source, cache_dir):
        require_download(f"the {split} data", source.removeprefix("hub:"), LOCAL_DATA_HINT)
    if source.startswith("hub:"):
        try:
            return datasets.load_dataset(source[4:], split=split, cache_dir=cache_dir)
        except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as error:
            raise UserError(offline_hint(source) + f" [{type(error).__name__}]") from None
    if not is_remote(source):
        path = Path(source)
        if path.is_dir():
            raise UserError(f"{split} file {source} is a directory; pass a TSV/CSV/JSONL file")
        if not path.is_file():
            raise UserError(f"{split} file not found: {source}")
        if path.stat().st_size == 0:
            raise UserError(f"{source}: file is empty (expected a header line and rows)")
    suffix = Path(source.split("?")[0]).suffix.lower()
    if not is_remote(source):
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
        if not is_remote(source):
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
        raise UserError(offline_hint(source) + f" [{type(error).__name__}]") from None
    except ValueError as error:
        # pyarrow's and pandas' parse errors (ArrowInvalid is a ValueError) name no line: the
        # scan above catches what it can; anything else still gets one line, not a traceback.
        if is_remote(source):
            raise
        raise UserError(f"{source}: cannot parse as {builder.upper()}: {' '.join(str(error).split())[:300]}") from None
    except OSError as error:
        if is_remote(source):
            raise UserError(offline_hint(source) + f" [{type(error).__name__}]") from None
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
    used = {text_column, config.label_column, config.id_column}
    report.ignored_columns[split] = [c for c in columns if c not in used]
    return cleaned


def require_two_classes(cleaned: Dataset, source: str, config: TrainConfig) -> None:
    """A training file with one class trains a constant predictor: stop instead of reporting it."""
    present = sorted(set(column_values(cleaned, "labels")))
    if len(present) == 1:
        raise UserError(
            f"{source}: every row has label {config.labels[present[0]]!r} ({len(cleaned):,} rows); training needs "
            f"at least two of {config.labels}: check the file, --label_column and --labels"
        )



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

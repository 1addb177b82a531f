"""Load, check, tokenize and batch the text-classification data, in pipeline order:

    sources    where each split's rows come from: NSMC, a directory layout, files, a hub dataset
    scan       a local file line by line, for what the parsers report without a line number
    table      one file as a checked table (columns found, labels as ids, problems counted)
    tokenizing tokenization, cached by `datasets`
    splits     a run's train/validation/test splits (validation carved from train when not given)
    batching   length-grouped training batches, sorted evaluation batches

Every file is read with `datasets` (so downloads and tokenization are cached on disk) and checked
row by row: an unknown label stops the run with the file and line; an empty text is kept as ""
and counted. README "Bad input" lists every case and its outcome.
"""

from trainer_pkg.data.batching import (
    LengthGroupedSampler,
    PackedTokens,
    eval_dataloader,
    length_grouped_batches,
    pad_multiple,
    train_dataloader,
)
from trainer_pkg.data.report import DataReport
from trainer_pkg.data.scan import FileScan, line_of_row, scan_local_file
from trainer_pkg.data.sources import NSMC_LABELS, NSMC_URLS, is_nsmc, missing_split_error, source_files
from trainer_pkg.data.splits import first_rows, load_tokenized
from trainer_pkg.data.table import (
    check_and_clean,
    column_values,
    find_text_column,
    infer_labels,
    label_ids,
    read_table,
    require_label_column,
    require_two_classes,
    resolve_columns_and_labels,
    texts_dataset,
)
from trainer_pkg.data.tokenizing import (
    TOKENIZED_FORMAT_VERSION,
    count_rows_used,
    tokenize,
    tokenizer_identity,
    truncation_length,
)

__all__ = [
    "DataReport", "FileScan", "LengthGroupedSampler", "NSMC_LABELS", "NSMC_URLS", "PackedTokens", "TOKENIZED_FORMAT_VERSION",
    "check_and_clean", "column_values", "count_rows_used", "eval_dataloader", "find_text_column", "first_rows", "infer_labels",
    "is_nsmc", "label_ids", "length_grouped_batches", "line_of_row", "load_tokenized", "missing_split_error",
    "pad_multiple", "read_table", "require_label_column", "require_two_classes", "resolve_columns_and_labels",
    "scan_local_file", "source_files", "texts_dataset", "tokenize", "tokenizer_identity", "train_dataloader",
    "truncation_length",
]

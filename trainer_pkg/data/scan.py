"""A line-by-line scan of a local file, for what the parsers report without a line number or not at all."""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from trainer_pkg.errors import UserError

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

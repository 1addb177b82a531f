"""What loading found: rows, and the problems handled rather than refused, per split."""

from __future__ import annotations

from dataclasses import dataclass, field


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
        # Counts are of the rows each split uses; blank lines and ignored columns are the file's (a
        # carved validation split's are train's).
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

"""Where each split's rows come from: NSMC, a directory in one of the common layouts, explicit files,
or a hub dataset.

A directory may hold `train`, `validation` (or `dev`, `valid`, `val`) and `test` files, each as
.tsv, .csv, .jsonl or .json; NSMC's `ratings_train.txt` / `ratings_test.txt` are recognised too.
Explicit `--train_file`/`--validation_file`/`--test_file` win over what a directory holds.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from trainer_pkg.config import TrainConfig
from trainer_pkg.errors import UserError

NSMC_URLS = {
    "train": "https://raw.githubusercontent.com/e9t/nsmc/master/ratings_train.txt",
    "test": "https://raw.githubusercontent.com/e9t/nsmc/master/ratings_test.txt",
}
NSMC_FILES = {"train": "ratings_train.txt", "test": "ratings_test.txt"}
# NSMC's labels are 0/1; these names are what its exports and predictions have always said.
NSMC_LABELS = ["negative", "positive"]
SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "dev", "valid", "val"), "test": ("test",)}
DATA_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")


def names_looked_for(split: str) -> list[str]:
    names = [f"{stem}{suffix}" for stem in SPLIT_STEMS[split] for suffix in DATA_SUFFIXES]
    return ([NSMC_FILES[split]] if split in NSMC_FILES else []) + names


def directory_files(directory: Path) -> dict[str, str]:
    """The split files a directory holds (each split's names are tried in the order names_looked_for gives)."""
    found = {}
    for split in SPLIT_STEMS:
        present = [name for name in names_looked_for(split) if (directory / name).is_file()]
        if len(present) > 1:
            raise UserError(f"--data {directory}: both {present[0]} and {present[1]} could be the {split} split; "
                            f"pass --{split}_file FILE to choose")
        if present:
            found[split] = str(directory / present[0])
    return found


def missing_split_error(config: TrainConfig, split: str) -> UserError:
    """No file for a split that is needed: say where it was looked for and which flag gives it."""
    if config.data and Path(config.data).is_dir():
        return UserError(f"--data {config.data}: no {split} file there (looked for {', '.join(names_looked_for(split))}); "
                         f"rename yours, or pass --{split}_file FILE")
    return UserError(f"no {split} data: pass --{split}_file FILE or --data DIR")


def is_nsmc(config: TrainConfig) -> bool:
    """Whether the training rows are NSMC's (the default job, or a directory of its files)."""
    if config.train_file:
        return Path(config.train_file).name == NSMC_FILES["train"]
    if config.data is None or config.data == "nsmc":
        return True
    return Path(config.data).is_dir() and (Path(config.data) / NSMC_FILES["train"]).is_file()


def source_files(config: TrainConfig) -> dict[str, str]:
    """Where each split comes from: a local path or a URL ('hub:ID' for a hub dataset).

    Without --data, explicit files are the whole story; NSMC is the default only when no
    --train_file is given either.
    """
    explicit = {split: path for split, path in (("train", config.train_file), ("validation", config.validation_file),
                                                ("test", config.test_file)) if path}
    data = config.data if config.data is not None or "train" in explicit else "nsmc"
    if data is None or ("train" in explicit and "test" in explicit):
        sources = {}
    elif data == "nsmc":
        sources = dict(NSMC_URLS)
    elif Path(data).is_dir():
        sources = directory_files(Path(data))
    elif data.startswith((".", "/", "~")) or data.count("/") > 1:
        raise UserError(f"--data {data}: no such directory (expected a directory of train/validation/test files, "
                        "'nsmc', or a hub dataset id)")
    else:
        sources = {split: f"hub:{data}" for split in ("train", "test")}
    return {**sources, **explicit}


def is_remote(source: str) -> bool:
    return source.startswith(("http://", "https://", "hub:"))


def offline_hint(source: str) -> str:
    return f"cannot download {source.removeprefix('hub:')} (no network or hub unreachable): {LOCAL_DATA_HINT}"


def download_cached(source: str, cache_dir: str | None) -> bool:
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

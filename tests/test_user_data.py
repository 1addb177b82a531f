"""A user's own data: directory layouts, a validation file, labels read from the data, the text
column found when there is one candidate. Each refusal is one line naming the file and the flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_module
from helpers_tiny import synthetic_rows

from trainer_pkg.config import TrainConfig
from trainer_pkg.data import label_ids, load_tokenized, resolve_columns_and_labels, source_files
from trainer_pkg.errors import UserError

pytestmark = pytest.mark.fast  # make test-fast


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def write_rows(path: Path, rows: list[dict], columns: list[str]) -> Path:
    """rows as TSV, CSV or JSONL by the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        return path
    delimiter = "," if path.suffix == ".csv" else "\t"
    lines = [delimiter.join(columns)] + [delimiter.join(str(row[c]) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sst2_rows(n: int, seed: int, label=lambda label: label) -> list[dict]:
    """SST-2's columns (id, sentence, label); texts without commas so one writer serves TSV and CSV."""
    return [{"id": row_id, "sentence": text.replace(",", " ").replace('"', ""), "label": label(value)}
            for row_id, text, value in synthetic_rows(n, seed)]


def config_for(tmp_path: Path, **values) -> TrainConfig:
    config = TrainConfig(cache_dir=str(tmp_path / "cache"), validation_size=20, **values)
    config.validate()
    return config


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_a_train_dev_directory_trains_on_train_and_validates_on_dev(tmp_path, tok, suffix):
    data = tmp_path / "sst2"
    write_rows(data / f"train{suffix}", sst2_rows(120, 0), ["id", "sentence", "label"])
    write_rows(data / f"dev{suffix}", sst2_rows(30, 1), ["id", "sentence", "label"])
    config = config_for(tmp_path, data=str(data))
    assert source_files(config) == {"train": str(data / f"train{suffix}"), "validation": str(data / f"dev{suffix}")}
    resolved = resolve_columns_and_labels(config)
    assert resolved.text_column == "sentence"  # the one column besides id and label
    assert resolved.labels == ["0", "1"]  # ids 0..K-1, named as they are
    splits, report = load_tokenized(config, tok)
    # Nothing carved: all 120 rows train, the dev file validates, and there is no test split.
    assert {name: len(split) for name, split in splits.items()} == {"train": 120, "validation": 30}
    assert not report.carved_validation


def test_a_directory_with_all_three_splits_and_a_validation_file_flag(tmp_path, tok):
    data = tmp_path / "three"
    for name, n, seed in (("train", 100, 0), ("validation", 25, 1), ("test", 35, 2)):
        write_rows(data / f"{name}.jsonl", sst2_rows(n, seed), ["id", "sentence", "label"])
    assert set(source_files(config_for(tmp_path, data=str(data)))) == {"train", "validation", "test"}
    # --validation_file wins over the directory's, and is not carved from train.
    other = write_rows(tmp_path / "other_dev.tsv", sst2_rows(15, 3), ["id", "sentence", "label"])
    splits, _ = load_tokenized(config_for(tmp_path, data=str(data), validation_file=str(other)), tok)
    assert {name: len(split) for name, split in splits.items()} == {"train": 100, "validation": 15, "test": 35}


def test_a_directory_without_a_training_file_names_what_it_looked_for(tmp_path, tok):
    data = tmp_path / "nothing"
    write_rows(data / "training_data.tsv", sst2_rows(10, 0), ["id", "sentence", "label"])
    with pytest.raises(UserError) as caught:
        load_tokenized(config_for(tmp_path, data=str(data)), tok)
    message = str(caught.value)
    assert f"--data {data}: no train file there" in message
    for name in ("ratings_train.txt", "train.tsv", "train.csv", "train.jsonl"):
        assert name in message
    assert "--train_file FILE" in message
    # Two candidates for one split: the user chooses.
    write_rows(data / "train.tsv", sst2_rows(10, 0), ["id", "sentence", "label"])
    write_rows(data / "train.csv", sst2_rows(10, 0), ["id", "sentence", "label"])
    with pytest.raises(UserError, match=r"both train\.tsv and train\.csv could be the train split; pass --train_file"):
        source_files(config_for(tmp_path, data=str(data)))


def test_labels_are_read_from_the_training_data(tmp_path, tok):
    names = write_rows(tmp_path / "names.tsv", sst2_rows(60, 0, lambda v: "pos" if v else "neg"),
                       ["id", "sentence", "label"])
    assert resolve_columns_and_labels(config_for(tmp_path, train_file=str(names))).labels == ["neg", "pos"]
    # Star ratings 1..5 are names, in numeric order: "1" is the first class, not id 1.
    stars = [{"id": i, "sentence": f"review {i}", "label": 1 + i % 5} for i in range(50)]
    stars_file = write_rows(tmp_path / "stars.tsv", stars, ["id", "sentence", "label"])
    config = resolve_columns_and_labels(config_for(tmp_path, train_file=str(stars_file)))
    assert config.labels == ["1", "2", "3", "4", "5"]
    assert label_ids(["1", "5", 3], config.labels) == ([0, 4, 2], None)
    assert label_ids(["0"], config.labels)[1] == 0  # "0" is no class here
    splits, _ = load_tokenized(config, tok)
    assert sorted(set(splits["train"]["labels"]) | set(splits["validation"]["labels"])) == [0, 1, 2, 3, 4]
    # Given labels win; NSMC keeps its names.
    given = config_for(tmp_path, train_file=str(names), labels=["neg", "pos"])
    assert resolve_columns_and_labels(given).labels == ["neg", "pos"]
    nsmc = tmp_path / "nsmc"
    write_rows(nsmc / "ratings_train.txt", sst2_rows(30, 0), ["id", "sentence", "label"])
    assert resolve_columns_and_labels(config_for(tmp_path, data=str(nsmc))).labels == ["negative", "positive"]
    one_class = write_rows(tmp_path / "one.tsv", [{"id": 1, "sentence": "x", "label": "a"}] * 3,
                           ["id", "sentence", "label"])
    with pytest.raises(UserError, match=r"one\.tsv: the 'label' column holds only 'a' as labels"):
        resolve_columns_and_labels(config_for(tmp_path, train_file=str(one_class)))


def test_the_text_column_is_found_when_unambiguous_and_asked_for_otherwise(tmp_path):
    rows = [{"id": i, "title": f"t{i}", "review": f"text {i}", "label": i % 2} for i in range(20)]
    named = write_rows(tmp_path / "named.tsv", rows, ["id", "title", "review", "label"])
    assert resolve_columns_and_labels(config_for(tmp_path, train_file=str(named))).text_column == "review"
    rows = [{"id": i, "title": f"t{i}", "body": f"text {i}", "label": i % 2} for i in range(20)]
    unclear = write_rows(tmp_path / "unclear.tsv", rows, ["id", "title", "body", "label"])
    with pytest.raises(UserError) as caught:
        resolve_columns_and_labels(config_for(tmp_path, train_file=str(unclear)))
    assert str(caught.value) == (f"{unclear}: cannot tell which column holds the text (text columns title, body; "
                                 "all columns: id, title, body, label); pass --text_column NAME")
    assert resolve_columns_and_labels(config_for(tmp_path, train_file=str(unclear), text_column="body")).text_column \
        == "body"


def test_train_on_a_train_dev_directory_end_to_end(tmp_path, tiny_model, cache_env):
    """No column or label flags: the export names the classes as the data does, and the final report,
    with no test split, is on the dev file and says so."""
    data = tmp_path / "mydata"
    write_rows(data / "train.csv", sst2_rows(300, 0, lambda v: "good" if v else "bad"), ["id", "sentence", "label"])
    write_rows(data / "dev.csv", sst2_rows(60, 1, lambda v: "good" if v else "bad"), ["id", "sentence", "label"])
    output_dir = tmp_path / "run"
    result = run_module("trainer_pkg.train", "--data", data, "--model", tiny_model, "--from_scratch",
                        "--output_dir", output_dir, "--max_steps", "12", "--lr", "3e-3", "--report_to", "none",
                        env=cache_env)
    assert "no test split: the report is on the validation split" in result.stderr
    metrics = json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["test"] is None and metrics["data"]["rows"] == {"train": 300, "validation": 60}
    report = json.loads((output_dir / "validation_report.json").read_text(encoding="utf-8"))
    assert report["accuracy"] == metrics["validation"]["accuracy"]
    exported = json.loads((output_dir / "model" / "config.json").read_text(encoding="utf-8"))
    assert exported["id2label"] == {"0": "bad", "1": "good"}
    saved = yaml.safe_load((output_dir / "run_config.yaml").read_text(encoding="utf-8"))
    assert saved["text_column"] == "sentence" and saved["labels"] == ["bad", "good"]
    # evaluate scores the run's own scored split by default: the dev file.
    evaluated = run_module("trainer_pkg.evaluate", output_dir / "model", "--output", tmp_path / "eval.json",
                           env=cache_env)
    assert "dev.csv" in evaluated.stderr
    assert json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["accuracy"] == report["accuracy"]

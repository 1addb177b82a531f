"""Data loading, checking, tokenization, caching and batching, on tiny local files."""

from __future__ import annotations

import csv
import json
import random
import socket
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers_tiny import FILLER_WORDS, synthetic_rows, write_nsmc_dir, write_tiny_model_dir
from transformers import DataCollatorWithPadding

from trainer_pkg.config import TrainConfig
from trainer_pkg.data import (
    NSMC_URLS,
    DataReport,
    LengthGroupedSampler,
    PackedTokens,
    check_and_clean,
    eval_dataloader,
    load_tokenized,
    pad_multiple,
    read_table,
    resolve_columns_and_labels,
    source_files,
    texts_dataset,
    train_dataloader,
)
from trainer_pkg.errors import UserError

pytestmark = pytest.mark.fast  # make test-fast

N_TRAIN, N_TEST, N_VALID = 200, 60, 40


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    directory = write_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))
    return AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture
def nsmc(tmp_path):
    return write_nsmc_dir(tmp_path / "nsmc", N_TRAIN, N_TEST, seed=0, empty_train=2)


def make_config(tmp_path: Path, data: Path | str, **overrides) -> TrainConfig:
    values = dict(data=str(data), cache_dir=str(tmp_path / "cache"), validation_size=N_VALID)
    values.update(overrides)
    config = TrainConfig(**values)
    config.validate()
    return config


def raw_rows(path: Path) -> list[list[str]]:
    """A TSV read back without any parser that could interpret quotes."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.split("\t") for line in lines]


def write_tsv(path: Path, rows, header=("id", "document", "label")) -> Path:
    lines = ["\t".join(header)] + ["\t".join(str(value) for value in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def single_token_words(tok) -> list[str]:
    words = [w for w in FILLER_WORDS if w.isascii() and tok.tokenize(w) == [w]]
    assert len(words) >= 4, words
    return words


# --- helpers_tiny itself -----------------------------------------------------------------------


def test_synthetic_rows_are_balanced_deterministic_and_quoted():
    rows = synthetic_rows(100, seed=3)
    assert rows == synthetic_rows(100, seed=3)
    assert rows != synthetic_rows(100, seed=4)
    assert sum(label for _, _, label in rows) == 50
    assert len({row_id for row_id, _, _ in rows}) == 100
    assert any('"' in text for _, text, _ in rows)
    assert any("'" in text for _, text, _ in rows)
    assert not any("\t" in text or "\n" in text for _, text, _ in rows)


def test_tiny_model_dir_is_deterministic_and_consistent(tmp_path, tok):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    first = write_tiny_model_dir(tmp_path / "a")
    second = write_tiny_model_dir(tmp_path / "b")
    for name in ("vocab.txt", "config.json", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    config = AutoConfig.from_pretrained(str(first))
    assert config.model_type == "bert" and config.hidden_size == 32 and config.num_hidden_layers == 2
    assert config.vocab_size == len(tok) == len((first / "vocab.txt").read_text(encoding="utf-8").splitlines())
    assert tok.model_max_length == 128 and tok.do_lower_case
    config.num_labels = 2
    model = AutoModelForSequenceClassification.from_config(config)
    batch = tok(["Great MOVIE 최고", "지루하다"], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_tiny_tokenizer_knows_the_corpus(tok):
    ids = tok(" ".join(text for _, text, _ in synthetic_rows(50, seed=9)), add_special_tokens=False)["input_ids"]
    assert sum(i == tok.unk_token_id for i in ids) < 0.02 * len(ids)
    assert tok.pad_token_id == 0


# --- sources -----------------------------------------------------------------------------------


def test_source_files(tmp_path, nsmc):
    assert source_files(TrainConfig()) == {
        "train": "https://raw.githubusercontent.com/e9t/nsmc/master/ratings_train.txt",
        "test": "https://raw.githubusercontent.com/e9t/nsmc/master/ratings_test.txt",
    }
    assert source_files(TrainConfig(data=str(nsmc))) == {
        "train": str(nsmc / "ratings_train.txt"),
        "test": str(nsmc / "ratings_test.txt"),
    }
    mixed = source_files(TrainConfig(train_file="a.jsonl", test_file="b.csv"))
    assert mixed == {"train": "a.jsonl", "test": "b.csv"}
    assert source_files(TrainConfig(data="someone/dataset")) == {"train": "hub:someone/dataset", "test": "hub:someone/dataset"}
    with pytest.raises(UserError, match="no such directory"):
        source_files(TrainConfig(data=str(tmp_path / "missing")))


def _network_up() -> bool:
    try:
        socket.create_connection(("raw.githubusercontent.com", 443), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(_network_up(), reason="network reachable: the offline error cannot be tested")
def test_nsmc_url_offline_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as caught:
        read_table(NSMC_URLS["train"], "train", cache_dir=str(tmp_path / "cache"))
    message = str(caught.value)
    assert "cannot download" in message and NSMC_URLS["train"] in message
    assert "--data" in message and "--train_file/--test_file" in message


# --- loading ------------------------------------------------------------------------------------


def test_load_tokenized_splits_and_row_counts(tmp_path, nsmc, tok):
    splits, report = load_tokenized(make_config(tmp_path, nsmc), tok)
    assert set(splits) == {"train", "validation", "test"}
    assert {name: len(split) for name, split in splits.items()} == {
        "train": N_TRAIN - N_VALID, "validation": N_VALID, "test": N_TEST,
    }
    assert report.rows == {"train": N_TRAIN - N_VALID, "validation": N_VALID, "test": N_TEST}
    assert report.tokenized_from_cache == {"train": False, "test": False}
    for split in splits.values():
        assert {"input_ids", "attention_mask", "labels", "length", "id"} <= set(split.column_names)
        assert split["length"] == [len(ids) for ids in split["input_ids"]]

    # Labels and ids are carried through: every row matches the file by id.
    written = {row[0]: (row[1], int(row[2])) for row in raw_rows(nsmc / "ratings_train.txt")[1:]}
    for split in ("train", "validation"):
        for row in splits[split]:
            text, label = written[row["id"]]
            assert row["labels"] == label
            assert row["text"] == text  # kept for the report's examples
            assert row["input_ids"] == tok(text)["input_ids"]
    test_written = {row[0]: int(row[2]) for row in raw_rows(nsmc / "ratings_test.txt")[1:]}
    assert dict(zip(splits["test"]["id"], splits["test"]["labels"])) == test_written
    assert splits["test"]["id"] == list(test_written)  # the test set keeps file order


def test_validation_split_is_disjoint_and_seeded(tmp_path, nsmc, tok):
    def ids(seed):
        splits, _ = load_tokenized(make_config(tmp_path, nsmc, seed=seed), tok)
        return splits["train"]["id"], splits["validation"]["id"]

    train, valid = ids(42)
    assert not set(train) & set(valid)
    assert len(set(train) | set(valid)) == N_TRAIN
    train_again, valid_again = ids(42)
    assert valid_again == valid and train_again == train
    _, valid_other = ids(43)
    assert set(valid_other) != set(valid)


def test_no_validation_split_and_sample_limits(tmp_path, nsmc, tok):
    splits, report = load_tokenized(make_config(tmp_path, nsmc, validation_size=0), tok)
    assert set(splits) == {"train", "test"}
    assert len(splits["train"]) == N_TRAIN
    assert report.rows == {"train": N_TRAIN, "test": N_TEST}
    limited, report = load_tokenized(
        make_config(tmp_path, nsmc, max_train_samples=50, max_eval_samples=10), tok
    )
    assert report.rows == {"train": 50, "validation": 10, "test": 10}
    # Limited before tokenizing, the same rows as the first ones of the whole splits.
    whole, _ = load_tokenized(make_config(tmp_path, nsmc), tok)
    for split, count in report.rows.items():
        assert limited[split]["id"] == whole[split]["id"][:count], split
        assert limited[split]["input_ids"] == whole[split]["input_ids"][:count], split


def test_validation_size_too_large(tmp_path, nsmc, tok):
    with pytest.raises(UserError, match=r"validation_size 200 leaves no training rows \(200 rows\)"):
        load_tokenized(make_config(tmp_path, nsmc, validation_size=N_TRAIN), tok)


def test_empty_documents_are_kept_and_counted(tmp_path, nsmc, tok):
    empty_ids = [row[0] for row in raw_rows(nsmc / "ratings_train.txt")[1:] if row[1] == ""]
    assert len(empty_ids) == 2
    splits, report = load_tokenized(make_config(tmp_path, nsmc), tok)
    found = {}
    for split in ("train", "validation"):
        for row in splits[split]:
            if row["id"] in empty_ids:
                found[row["id"]] = (split, row)
    assert set(found) == set(empty_ids)
    for _, row in found.values():
        assert row["input_ids"] == [tok.cls_token_id, tok.sep_token_id]
    # Counted in the split that uses them (here the seed carves both into validation).
    in_split = {split: sum(where == split for where, _ in found.values()) for split in ("train", "validation")}
    assert report.empty_texts == {**in_split, "test": 0} and in_split == {"train": 0, "validation": 2}
    assert "validation: 40 rows (carved from train, 2 empty texts kept)" in report.lines()
    # Rows a sample limit leaves out are not counted.
    _, limited = load_tokenized(make_config(tmp_path, nsmc, max_eval_samples=1), tok)
    assert limited.empty_texts["validation"] == sum(row["input_ids"] == [tok.cls_token_id, tok.sep_token_id]
                                                    for row in splits["validation"].select(range(1)))


def test_quote_characters_come_back_intact(tmp_path, nsmc):
    path = nsmc / "ratings_train.txt"
    expected = [row[1] for row in raw_rows(path)[1:]]
    assert any('"' in text for text in expected) and any("'" in text for text in expected)
    assert any(text.startswith('"') for text in expected)  # a leading quote is what a CSV reader eats

    table = read_table(str(path), "train", cache_dir=str(tmp_path / "cache"))
    assert table.column_names == ["id", "document", "label"]
    assert len(table) == N_TRAIN
    assert table["document"] == expected

    cleaned = check_and_clean(table, str(path), resolve_columns_and_labels(make_config(tmp_path, nsmc)), "train",
                              DataReport())
    assert cleaned["text"] == expected
    assert cleaned["id"] == [row[0] for row in raw_rows(path)[1:]]


def test_numeric_looking_columns_stay_strings(tmp_path, tok):
    # Ids with leading zeros and texts that are only digits must not become numbers.
    rows = [("007", "123", 0), ("010", "4.50", 1), ("011", "nan", 0), ("012", "NA", 1), ("013", "great", 1)]
    directory = tmp_path / "digits"
    directory.mkdir()
    write_tsv(directory / "ratings_train.txt", rows)
    write_tsv(directory / "ratings_test.txt", rows)
    table = read_table(str(directory / "ratings_train.txt"), "train", cache_dir=str(tmp_path / "cache"))
    assert table["id"] == ["007", "010", "011", "012", "013"]
    assert table["document"] == ["123", "4.50", "nan", "NA", "great"]
    splits, report = load_tokenized(make_config(tmp_path, directory, validation_size=0), tok)
    assert splits["test"]["id"] == ["007", "010", "011", "012", "013"]
    assert report.empty_texts["test"] == 0


def test_labels_given_as_names(tmp_path, nsmc, tok):
    named = tmp_path / "named"
    named.mkdir()
    for name in ("ratings_train.txt", "ratings_test.txt"):
        rows = raw_rows(nsmc / name)
        write_tsv(named / name, [(r[0], r[1], ["negative", "positive"][int(r[2])]) for r in rows[1:]])
    by_name, _ = load_tokenized(make_config(tmp_path, named), tok)
    by_id, _ = load_tokenized(make_config(tmp_path, nsmc), tok)
    for split in ("train", "validation", "test"):
        assert by_name[split]["labels"] == by_id[split]["labels"]
        assert by_name[split]["id"] == by_id[split]["id"]


def test_custom_label_names_and_columns(tmp_path, tok):
    directory = tmp_path / "custom"
    directory.mkdir()
    rows = [(f"r{i}", text, ["neg", "neu", "pos"][i % 3]) for i, (_, text, _) in enumerate(synthetic_rows(30, 5))]
    header = ("key", "review", "sentiment")
    write_tsv(directory / "ratings_train.txt", rows, header)
    write_tsv(directory / "ratings_test.txt", rows[:9], header)
    config = make_config(
        tmp_path, directory, validation_size=5, labels=["neg", "neu", "pos"],
        text_column="review", label_column="sentiment", id_column="key",
    )
    splits, _ = load_tokenized(config, tok)
    assert splits["test"]["labels"] == [0, 1, 2] * 3
    assert splits["test"]["id"] == [f"r{i}" for i in range(9)]


@pytest.mark.parametrize("bad_label", ["2", "pos", "-1", "1.5"])
def test_unknown_label_names_file_and_line(tmp_path, nsmc, tok, bad_label):
    path = nsmc / "ratings_train.txt"
    rows = raw_rows(path)
    line_number = 58  # 1-based, the header is line 1
    rows[line_number - 1][2] = bad_label
    write_tsv(path, rows[1:])
    with pytest.raises(UserError) as caught:
        load_tokenized(make_config(tmp_path, nsmc), tok)
    message = str(caught.value)
    assert message.startswith(f"{path} line {line_number}: label {bad_label!r} is not one of")
    assert "--labels" in message


def test_unknown_label_in_test_file(tmp_path, nsmc, tok):
    path = nsmc / "ratings_test.txt"
    rows = raw_rows(path)
    rows[-1][2] = "positive!"
    write_tsv(path, rows[1:])
    with pytest.raises(UserError, match=rf"ratings_test\.txt line {N_TEST + 1}: label 'positive!'"):
        load_tokenized(make_config(tmp_path, nsmc), tok)


def test_missing_text_column(tmp_path, nsmc, tok):
    with pytest.raises(UserError) as caught:
        load_tokenized(make_config(tmp_path, nsmc, text_column="review"), tok)
    message = str(caught.value)
    assert "ratings_train.txt" in message
    assert "'review'" in message
    assert "columns: id, document, label" in message
    assert "--text_column" in message


def test_missing_label_column(tmp_path, nsmc, tok):
    with pytest.raises(UserError, match=r"no label column 'stars' \(columns: id, document, label\).*--label_column"):
        load_tokenized(make_config(tmp_path, nsmc, label_column="stars"), tok)


def test_missing_file(tmp_path, nsmc, tok):
    (nsmc / "ratings_test.txt").unlink()
    with pytest.raises(UserError, match=r"test file not found: .*ratings_test\.txt"):
        load_tokenized(make_config(tmp_path, nsmc, test_file=str(nsmc / "ratings_test.txt")), tok)
    with pytest.raises(UserError, match="train file not found"):
        load_tokenized(make_config(tmp_path, nsmc, train_file=str(tmp_path / "nope.tsv")), tok)


def test_empty_file(tmp_path, nsmc, tok):
    (nsmc / "ratings_train.txt").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=r"ratings_train\.txt: file is empty"):
        load_tokenized(make_config(tmp_path, nsmc), tok)


def test_ragged_row_is_a_user_error(tmp_path, nsmc, tok):
    path = nsmc / "ratings_train.txt"
    rows = raw_rows(path)
    rows[10] = [rows[10][0], "a\ttab inside", rows[10][2]]  # one field too many
    write_tsv(path, rows[1:])
    with pytest.raises(UserError, match=r"ratings_train\.txt line 11: 4 tab-separated fields, the header has 3"):
        load_tokenized(make_config(tmp_path, nsmc), tok)


def test_jsonl_and_csv_files(tmp_path, nsmc, tok):
    train_rows = synthetic_rows(80, seed=11)
    jsonl = tmp_path / "train.jsonl"
    with jsonl.open("w", encoding="utf-8") as file:
        for row_id, text, label in train_rows:
            file.write(json.dumps({"id": row_id, "document": text, "label": label}, ensure_ascii=False) + "\n")
    test_rows = [(row_id, f"{text}, and then, more", label) for row_id, text, label in synthetic_rows(30, seed=12)]
    test_rows[0] = (test_rows[0][0], '"quoted, with commas" and "more"', test_rows[0][2])
    csv_path = tmp_path / "test.csv"
    with csv_path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "document", "label"])
        writer.writerows(test_rows)
    assert '"""quoted, with commas""' in csv_path.read_text(encoding="utf-8")

    config = make_config(tmp_path, nsmc, train_file=str(jsonl), test_file=str(csv_path), validation_size=10)
    splits, report = load_tokenized(config, tok)
    assert report.rows == {"train": 70, "validation": 10, "test": 30}

    table = read_table(str(csv_path), "test", cache_dir=str(tmp_path / "cache"))
    assert table["document"] == [text for _, text, _ in test_rows]
    assert splits["test"]["id"] == [row_id for row_id, _, _ in test_rows]
    assert splits["test"]["labels"] == [label for _, _, label in test_rows]
    assert splits["test"]["input_ids"] == [tok(text)["input_ids"] for _, text, _ in test_rows]
    by_id = {row_id: (text, label) for row_id, text, label in train_rows}
    for row in splits["train"]:
        assert row["labels"] == by_id[row["id"]][1]
        assert row["input_ids"] == tok(by_id[row["id"]][0])["input_ids"]


@pytest.mark.parametrize("text_column, label_column", [("text", "label"), ("sentence", "labels")])
def test_hugging_face_style_column_names(tmp_path, tok, text_column, label_column):
    rows = synthetic_rows(30, seed=21)
    path = tmp_path / "data.jsonl"
    path.write_text(
        "\n".join(json.dumps({"id": i, text_column: t, label_column: l}, ensure_ascii=False) for i, t, l in rows) + "\n",
        encoding="utf-8",
    )
    config = make_config(tmp_path, "nsmc", train_file=str(path), test_file=str(path), validation_size=5,
                         text_column=text_column, label_column=label_column)
    splits, _ = load_tokenized(config, tok)
    assert splits["test"]["labels"] == [label for _, _, label in rows]
    assert splits["test"]["input_ids"] == [tok(text)["input_ids"] for _, text, _ in rows]


def test_windows_line_endings(tmp_path, nsmc, tok):
    crlf = tmp_path / "crlf"
    crlf.mkdir()
    for name in ("ratings_train.txt", "ratings_test.txt"):
        (crlf / name).write_bytes((nsmc / name).read_bytes().replace(b"\n", b"\r\n"))
    from_crlf, report = load_tokenized(make_config(tmp_path, crlf), tok)
    from_lf, report_lf = load_tokenized(make_config(tmp_path, nsmc), tok)
    assert report.empty_texts == report_lf.empty_texts and sum(report.empty_texts.values()) == 2
    for split in from_lf:
        assert from_crlf[split]["labels"] == from_lf[split]["labels"]
        assert from_crlf[split]["input_ids"] == from_lf[split]["input_ids"]


def test_jsonl_unknown_label_line_number(tmp_path, nsmc, tok):
    jsonl = tmp_path / "train.jsonl"
    lines = [json.dumps({"document": text, "label": label}) for _, text, label in synthetic_rows(40, seed=1)]
    lines[6] = json.dumps({"document": "x", "label": 7})
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"train\.jsonl line 7: label 7 is not one of"):
        load_tokenized(make_config(tmp_path, nsmc, train_file=str(jsonl), validation_size=5,
                                   labels=["negative", "positive"]), tok)


def test_texts_dataset_for_prediction(tmp_path, nsmc):
    table = texts_dataset(str(nsmc / "ratings_test.txt"), "document", "id", cache_dir=str(tmp_path / "cache"))
    rows = raw_rows(nsmc / "ratings_test.txt")[1:]
    assert set(table.column_names) == {"id", "text"}
    assert table["text"] == [row[1] for row in rows]
    assert table["id"] == [row[0] for row in rows]
    with pytest.raises(UserError, match="--text_column"):
        texts_dataset(str(nsmc / "ratings_test.txt"), "review", "id", cache_dir=str(tmp_path / "cache"))


# --- cache --------------------------------------------------------------------------------------


def test_second_load_uses_the_tokenized_cache(tmp_path, nsmc, tok):
    config = make_config(tmp_path, nsmc)
    first, report = load_tokenized(config, tok)
    assert report.tokenized_from_cache == {"train": False, "test": False}
    second, report_again = load_tokenized(config, tok)
    assert report_again.tokenized_from_cache == {"train": True, "test": True}
    assert "tokenized data from cache" in report_again.lines()[-1]
    for split in first:
        assert second[split]["input_ids"] == first[split]["input_ids"]
        assert second[split]["labels"] == first[split]["labels"]
        assert second[split]["id"] == first[split]["id"]
    assert report_again.empty_texts == report.empty_texts
    assert report_again.truncated_texts == report.truncated_texts


def test_changed_max_length_is_not_served_from_cache(tmp_path, nsmc, tok):
    load_tokenized(make_config(tmp_path, nsmc, max_length=64), tok)
    splits, report = load_tokenized(make_config(tmp_path, nsmc, max_length=6), tok)
    assert report.tokenized_from_cache == {"train": False, "test": False}
    assert max(splits["train"]["length"]) == 6


@pytest.mark.parametrize("changed", [{"seed": 7}, {"epochs": 3}, {"output_dir": "runs/other"}])
def test_tokenized_cache_survives_unrelated_settings(tmp_path, nsmc, tok, changed):
    load_tokenized(make_config(tmp_path, nsmc), tok)
    _, report = load_tokenized(make_config(tmp_path, nsmc, **changed), tok)
    assert report.tokenized_from_cache == {"train": True, "test": True}


def test_tokenizer_replaced_in_place_is_not_served_stale_ids(tmp_path, nsmc):
    from transformers import AutoTokenizer

    model_dir = write_tiny_model_dir(tmp_path / "model")
    config = make_config(tmp_path, nsmc)
    load_tokenized(config, AutoTokenizer.from_pretrained(str(model_dir)))
    vocab = (model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    reordered = vocab[:5] + vocab[5:][::-1]  # same tokens, same size, other ids
    (model_dir / "vocab.txt").write_text("\n".join(reordered) + "\n", encoding="utf-8")
    retrained = AutoTokenizer.from_pretrained(str(model_dir))
    splits, _ = load_tokenized(config, retrained)
    texts = [row[1] for row in raw_rows(nsmc / "ratings_test.txt")[1:]]
    assert splits["test"]["input_ids"] == [retrained(text)["input_ids"] for text in texts]


# --- truncation ---------------------------------------------------------------------------------


def test_truncation_is_counted_exactly(tmp_path, tok):
    words = single_token_words(tok)
    exactly_8 = " ".join(words[i % len(words)] for i in range(6))  # 6 words + [CLS] [SEP]
    nine = " ".join(words[i % len(words)] for i in range(7))
    long = " ".join(words[i % len(words)] for i in range(40))
    short = words[0]
    assert len(tok(exactly_8)["input_ids"]) == 8
    assert len(tok(nine)["input_ids"]) == 9
    texts = [exactly_8, nine, long, short, "", exactly_8, long]
    directory = tmp_path / "trunc"
    directory.mkdir()
    rows = [(str(i), text, i % 2) for i, text in enumerate(texts)]
    write_tsv(directory / "ratings_train.txt", rows)
    write_tsv(directory / "ratings_test.txt", rows[:4])

    splits, report = load_tokenized(make_config(tmp_path, directory, validation_size=0, max_length=8), tok)
    assert report.truncated_texts == {"train": 3, "test": 2}
    assert "train: 7 rows (1 empty texts kept, 3 texts truncated)" in report.lines()
    train = splits["train"]
    assert train["length"] == [8, 8, 8, 3, 2, 8, 8]
    for ids, text in zip(train["input_ids"], texts):
        full = tok(text)["input_ids"]
        assert ids == (full if len(full) <= 8 else full[:7] + [tok.sep_token_id])

    # The default limit is the tokenizer's model_max_length (128): nothing here reaches it.
    _, default_report = load_tokenized(make_config(tmp_path, directory, validation_size=0), tok)
    assert default_report.truncated_texts == {"train": 0, "test": 0}


# --- batching -------------------------------------------------------------------------------------


def skewed_lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [min(512, 3 + int(rng.lognormvariate(2.7, 0.9))) for _ in range(n)]


def padded_tokens(order: list[int], lengths: list[int], batch_size: int) -> int:
    total = 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        total += max(lengths[i] for i in batch) * len(batch)
    return total


def test_length_grouped_sampler_permutation_and_batches():
    lengths = skewed_lengths(1000, seed=0)
    batch_size = 16
    sampler = LengthGroupedSampler(lengths, batch_size, seed=3, group=5)
    order = list(sampler)
    assert len(sampler) == 1000
    assert sorted(order) == list(range(1000))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    assert len(batches[-1]) == 1000 % batch_size
    # Within a batch, lengths are sorted (longest first): each batch is a slice of a sorted chunk.
    for batch in batches:
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def test_length_grouped_sampler_exact_multiple_has_no_short_batch():
    lengths = skewed_lengths(320, seed=1)
    order = list(LengthGroupedSampler(lengths, 32, seed=0))
    assert sorted(order) == list(range(320))
    assert all(len(order[i:i + 32]) == 32 for i in range(0, 320, 32))


def test_length_grouped_sampler_seeding():
    lengths = skewed_lengths(500, seed=2)
    first = LengthGroupedSampler(lengths, 8, seed=1, group=4)
    again = LengthGroupedSampler(lengths, 8, seed=1, group=4)
    assert list(first) == list(again)
    assert list(first) == list(first)  # iterating twice gives the same epoch
    epoch0 = list(first)
    first.set_epoch(1)
    again.set_epoch(1)
    epoch1 = list(first)
    assert epoch1 != epoch0
    assert epoch1 == list(again)
    assert sorted(epoch1) == list(range(500))
    assert list(LengthGroupedSampler(lengths, 8, seed=2, group=4)) != epoch0


def test_length_grouped_sampler_cuts_padding():
    lengths = skewed_lengths(3000, seed=4)
    batch_size = 16
    grouped = padded_tokens(list(LengthGroupedSampler(lengths, batch_size, seed=0)), lengths, batch_size)
    rng = random.Random(0)
    random_total = 0
    for _ in range(3):
        permutation = list(range(len(lengths)))
        rng.shuffle(permutation)
        random_total += padded_tokens(permutation, lengths, batch_size)
    assert grouped <= 0.7 * (random_total / 3), (grouped, random_total / 3)
    assert grouped >= sum(lengths)


def test_packed_batches_equal_the_transformers_collator(tok):
    """PackedTokens pads like DataCollatorWithPadding(pad_to_multiple_of=8), also on a dataset
    whose rows went through a split and a select (an indices mapping over the Arrow table)."""
    texts = [text for _, text, _ in synthetic_rows(90, seed=4)]
    full = token_dataset(tok, texts)
    subset = full.train_test_split(test_size=20, seed=0)["train"].select(range(5, 60))
    packed = PackedTokens(subset, tok.pad_token_id, with_row=True)
    reference = DataCollatorWithPadding(tok, pad_to_multiple_of=8, return_tensors="pt")
    for indices in ([0, 1, 2], [54, 3, 17, 17, 40], list(range(55))):
        batch = packed.collate(indices)
        expected = reference([{k: subset[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in indices])
        assert batch["input_ids"].shape[1] % 8 == 0
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(batch[key], expected[key]), key
        assert batch["row"].tolist() == indices


def token_dataset(tok, texts: list[str]) -> Dataset:
    encoded = tok(texts, return_token_type_ids=False)
    return Dataset.from_dict({
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": [i % 2 for i in range(len(texts))],
        "length": [len(ids) for ids in encoded["input_ids"]],
    })


def test_eval_dataloader_rows_sorted_by_length(tok):
    texts = [text for _, text, _ in synthetic_rows(37, seed=8)]
    dataset = token_dataset(tok, texts)
    batches = list(eval_dataloader(dataset, tok, batch_size=8))
    assert len(batches) == 5
    rows = torch.cat([b["row"] for b in batches]).tolist()
    assert sorted(rows) == list(range(37))
    lengths = dataset["length"]
    # Shortest first: the rows that pad a multi-process run's last round never lengthen a batch.
    assert [lengths[r] for r in rows] == sorted(lengths)
    for batch in batches:
        # Padded to a multiple of 8 on a GPU, to the longest row on the CPU (data.pad_multiple).
        longest = max(lengths[r] for r in batch["row"].tolist())
        assert batch["input_ids"].shape[1] == -(-longest // pad_multiple()) * pad_multiple()
        assert set(batch) == {"input_ids", "attention_mask", "labels", "row"}
        for position, row in enumerate(batch["row"].tolist()):
            n = lengths[row]
            assert batch["input_ids"][position, :n].tolist() == dataset[row]["input_ids"]
            assert batch["labels"][position].item() == dataset[row]["labels"]


@pytest.mark.parametrize("group_by_length", [True, False])
def test_train_dataloader_covers_every_row_once(tmp_path, tok, group_by_length):
    texts = [text for _, text, _ in synthetic_rows(70, seed=6)]
    dataset = token_dataset(tok, texts).add_column("id", [str(i) for i in range(70)])
    config = TrainConfig(per_device_batch_size=16, group_by_length=group_by_length, seed=1)
    loader = train_dataloader(dataset, tok, config)
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches][:-1] == [16] * 4
    assert batches[-1]["input_ids"].shape[0] == 70 - 64
    seen = sorted(tuple(row[: int(mask.sum())]) for b in batches
                  for row, mask in zip(b["input_ids"].tolist(), b["attention_mask"]))
    assert seen == sorted(tuple(ids) for ids in dataset["input_ids"])
    assert all(set(b) == {"input_ids", "attention_mask", "labels"} for b in batches)


def test_explicit_train_and_test_files_make_data_irrelevant(tmp_path):
    config = TrainConfig(data=str(tmp_path / "missing_dir"), train_file="a.tsv", test_file="b.jsonl")
    assert source_files(config) == {"train": "a.tsv", "test": "b.jsonl"}
    with pytest.raises(UserError, match="missing_dir"):
        source_files(TrainConfig(data=str(tmp_path / "missing_dir"), train_file="a.tsv"))

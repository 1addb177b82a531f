"""TrainConfig: defaults, YAML + command line, validation, typed parsing, save/load, --help."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer_pkg.config import (
    DEFAULT_LR_FROM_SCRATCH,
    DEFAULT_LR_PRETRAINED,
    FIELD_NAMES,
    NOT_SAVED,
    TrainConfig,
    build_parser,
    config_from_file,
    field_docs,
    load_config,
)
from trainer_pkg.errors import UserError

pytestmark = pytest.mark.fast  # make test-fast

REPO = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, content: dict) -> str:
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    return str(path)


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_are_the_reference_job():
    config = load_config([])
    assert config.model == "google-bert/bert-base-multilingual-uncased"
    assert config.tokenizer_name == config.model
    # No data, text column or labels given: NSMC, its text column found in the file, its class names.
    assert config.data is None and config.train_file is None
    assert config.validation_size == 5000
    assert config.labels is None and config.text_column is None
    assert config.label_column == "label" and config.id_column == "id"
    assert config.from_scratch is False
    assert config.lr is None and config.effective_lr == DEFAULT_LR_PRETRAINED == 5e-5
    assert config == TrainConfig()


def test_effective_lr_depends_on_from_scratch_unless_set():
    assert load_config(["--from_scratch"]).effective_lr == DEFAULT_LR_FROM_SCRATCH
    assert load_config(["--from_scratch", "--lr", "0.25"]).effective_lr == 0.25
    assert load_config(["--lr", "3e-4"]).effective_lr == pytest.approx(3e-4, rel=1e-15)


# --- YAML and command line --------------------------------------------------------------------


def test_yaml_then_command_line_precedence(tmp_path):
    path = write_yaml(
        tmp_path / "run.yaml",
        {"lr": 0.5, "epochs": 3, "labels": ["bad", "good"], "model_overrides": {"num_hidden_layers": 2}},
    )
    from_file = load_config(["--config", path])
    assert from_file.lr == 0.5 and from_file.epochs == 3
    assert from_file.labels == ["bad", "good"]
    assert from_file.model_overrides == {"num_hidden_layers": 2}

    config = load_config(["--config", path, "--lr", "0.1", "--seed", "7"])
    assert config.lr == 0.1  # the command line wins
    assert config.epochs == 3  # the file still applies where the command line is silent
    assert config.seed == 7
    assert config.labels == ["bad", "good"]
    # Flag order does not matter: the command line wins even when given before --config.
    assert load_config(["--lr", "0.1", "--config", path]).lr == 0.1


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    # PyYAML reads `5e-5` as a string (YAML 1.1 needs a dot); the config must still get a float.
    path = tmp_path / "run.yaml"
    path.write_text("lr: 5e-5\nwarmup_ratio: 0.1\n", encoding="utf-8")
    config = load_config(["--config", str(path)])
    assert isinstance(config.lr, float) and config.lr == 5e-5
    assert config.warmup_ratio == 0.1


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    config = load_config(["--config", str(path)])
    content = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key, value in content.items():
        assert getattr(config, key) == value, key


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(["--config", str(tmp_path / "nope.yaml")])
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: 0.1\nepochs: [1, 2\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"broken\.yaml.*not valid YAML"):
        load_config(["--config", str(broken)])
    listing = tmp_path / "list.yaml"
    listing.write_text("- lr\n- epochs\n", encoding="utf-8")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(["--config", str(listing)])


@pytest.mark.parametrize(
    "key, suggestion",
    [("epoch", "epochs"), ("seeds", "seed"), ("warmup", "warmup_ratio"), ("gradient_accumulation_steps", "grad_accum")],
)
def test_unknown_yaml_key_names_it_and_suggests_closest(tmp_path, key, suggestion):
    path = write_yaml(tmp_path / "run.yaml", {"epochs": 2, key: 1})
    with pytest.raises(UserError) as caught:
        load_config(["--config", path])
    message = str(caught.value)
    assert path in message
    assert repr(key) in message
    assert f"did you mean {suggestion!r}" in message


@pytest.mark.parametrize("key", ["lerning_rate", "learning_rate"])
def test_unknown_yaml_key_learning_rate_suggests_lr(tmp_path, key):
    path = write_yaml(tmp_path / "run.yaml", {key: 0.1})
    with pytest.raises(UserError) as caught:
        load_config(["--config", path])
    assert repr(key) in str(caught.value)
    assert "did you mean 'lr'" in str(caught.value)


@pytest.mark.parametrize(
    "argv, key, suggestion",
    [
        (["--epoch", "2"], "epoch", "epochs"),
        (["--lrr", "1"], "lrr", "lr"),
        (["--lrr=1"], "lrr", "lr"),
        (["--max_seq_length", "64"], "max_seq_length", "max_length"),
        (["--from-scratch"], "from-scratch", "from_scratch"),
    ],
)
def test_unknown_flag_names_it_and_suggests_closest(argv, key, suggestion):
    with pytest.raises(UserError) as caught:
        load_config(["--seed", "1", *argv])
    message = str(caught.value)
    assert message.startswith("command line: ")
    assert repr(key) in message
    assert f"did you mean {suggestion!r}" in message
    assert "\n" not in message


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(UserError) as caught:
        load_config(["--zzzzzz", "1"])
    message = str(caught.value)
    assert "'zzzzzz'" in message
    assert "valid keys:" in message
    assert all(name in message for name in FIELD_NAMES)


def test_every_unknown_key_is_named_in_one_error(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"epoch": 2, "lerning_rate": 0.1, "seed": 1, "zzzzzz": 3})
    with pytest.raises(UserError) as caught:
        load_config(["--config", path])
    message = str(caught.value)
    assert message.startswith(f"{path}: unknown config keys 'epoch' (did you mean 'epochs'?), 'lerning_rate' "
                              "(did you mean 'lr'?), 'zzzzzz'; valid keys: ")
    with pytest.raises(UserError) as caught:
        load_config(["--epoch", "2", "--lr", "-1", "--lrr=1", "--warmup", "0.1"])
    assert str(caught.value) == ("command line: unknown config keys 'epoch' (did you mean 'epochs'?), 'lrr' (did you "
                                 "mean 'lr'?), 'warmup' (did you mean 'warmup_ratio'?)")


def test_help_answers_without_importing_torch_and_shows_defaults():
    # Wide enough that argparse does not wrap a help line.
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "trainer_pkg.train", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "trainer_pkg.config" in imported and not {"torch", "transformers", "datasets"} & imported
    assert "--save_every_minutes" in result.stdout and "[default: 30.0]" in result.stdout


def test_abbreviated_flags_are_not_accepted():
    # allow_abbrev=False: '--epo' must not silently mean '--epochs'.
    with pytest.raises(UserError, match="'epo'"):
        load_config(["--epo", "3"])


# --- validation --------------------------------------------------------------------------------


def test_validate_reports_every_problem_at_once():
    config = TrainConfig(
        epochs=0, lr=-1.0, warmup_ratio=1.5, mixed_precision="fp8", labels=["only"], metric_for_best="loss",
        keep_checkpoints=0, max_length=0, eval_batch_size=0,
    )
    with pytest.raises(UserError) as caught:
        config.validate()
    message = str(caught.value)
    assert message.startswith("invalid configuration: ")
    for fragment in (
        "epochs must be >= 1 or unset (got 0)",
        "lr must be > 0 (got -1.0)",
        "warmup_ratio must be in [0, 1) (got 1.5)",
        "mixed_precision must be one of",
        "'fp8'",
        "labels needs at least two class names",
        "metric_for_best must be",
        "keep_checkpoints must be >= 1 (got 0)",
        "max_length must be >= 1 or unset (got 0)",
        "eval_batch_size must be >= 1 or unset (got 0)",
    ):
        assert fragment in message, fragment
    assert "\n" not in message


def test_validate_accepts_defaults_and_edge_values():
    TrainConfig().validate()
    TrainConfig(validation_size=0, eval_every=0, warmup_ratio=0.0, max_grad_norm=0.0, num_workers=0).validate()


def test_validate_other_problems():
    with pytest.raises(UserError, match="labels has duplicates"):
        TrainConfig(labels=["a", "b", "a"]).validate()
    with pytest.raises(UserError, match="eval_every needs a validation split"):
        TrainConfig(validation_size=0, eval_every=10).validate()
    with pytest.raises(UserError, match="model_overrides key 'not a name'"):
        TrainConfig(model_overrides={"not a name": 1}).validate()


def test_load_config_runs_validate():
    with pytest.raises(UserError) as caught:
        load_config(["--epochs", "0", "--per_device_batch_size", "0"])
    assert "epochs must be >= 1" in str(caught.value)
    assert "per_device_batch_size must be >= 1" in str(caught.value)


# --- typed parsing ----------------------------------------------------------------------------


def test_model_overrides_parse_to_typed_values():
    config = load_config(["--model_overrides", "a=1,b=0.5,c=gelu"])
    assert config.model_overrides == {"a": 1, "b": 0.5, "c": "gelu"}
    assert type(config.model_overrides["a"]) is int
    assert type(config.model_overrides["b"]) is float
    assert type(config.model_overrides["c"]) is str
    spaced = load_config(["--model_overrides", " num_hidden_layers = 2 , tie=true ,"])
    assert spaced.model_overrides == {"num_hidden_layers": 2, "tie": True}


@pytest.mark.parametrize("text", ["a=[1", 'a="x'])
def test_model_overrides_unparsable_value_is_a_user_error(text):
    with pytest.raises(UserError, match="--model_overrides"):
        load_config(["--model_overrides", text])


def test_model_overrides_malformed_item_is_a_user_error():
    with pytest.raises(UserError, match=r"--model_overrides: expected KEY=VALUE, got 'hidden_size'"):
        load_config(["--model_overrides", "num_hidden_layers=2,hidden_size"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config(["--model_overrides", "=3"])


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], False),
        (["--from_scratch"], True),
        (["--from_scratch", "true"], True),
        (["--from_scratch", "false"], False),
        (["--from_scratch", "no"], False),
        (["--from_scratch", "1"], True),
        (["--from_scratch=0"], False),
        (["--from_scratch", "--epochs", "2"], True),  # a bare bool flag before another flag
    ],
)
def test_bool_flags(argv, expected):
    config = load_config(argv)
    assert config.from_scratch is expected


def test_bool_flag_bad_value():
    with pytest.raises(UserError, match=r"--group_by_length: group_by_length expects bool, got 'maybe'"):
        load_config(["--group_by_length", "maybe"])


def test_bad_type_is_a_one_line_user_error():
    with pytest.raises(UserError) as caught:
        load_config(["--epochs", "two"])
    message = str(caught.value)
    assert message == "--epochs: epochs expects int, got 'two'"
    with pytest.raises(UserError, match="expects float, got 'fast'"):
        load_config(["--lr", "fast"])


def test_bad_type_in_yaml_names_the_file(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"epochs": 1.5})
    with pytest.raises(UserError) as caught:
        load_config(["--config", path])
    assert str(caught.value) == f"{path}: epochs expects int, got 1.5"


@pytest.mark.parametrize("key", ["log_every", "weight_decay"])
def test_null_yaml_value_for_required_field_is_a_user_error(tmp_path, key):
    path = tmp_path / "run.yaml"
    path.write_text(f"{key}:\n", encoding="utf-8")
    with pytest.raises(UserError, match=key):
        load_config(["--config", str(path)])


def test_null_yaml_value_unsets_an_optional_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.1\nmax_length: null\ntokenizer: ~\n", encoding="utf-8")
    config = load_config(["--config", str(path)])
    assert config.max_length is None and config.tokenizer is None and config.lr == 0.1


def test_typed_values_from_command_line():
    config = load_config(
        ["--epochs", "3", "--lr", "0.001", "--labels", "neg, neu ,pos", "--max_length", "64", "--resume",
         "--mixed_precision", "bf16"]
    )
    assert config.epochs == 3 and type(config.epochs) is int
    assert config.lr == 0.001 and type(config.lr) is float
    assert config.labels == ["neg", "neu", "pos"]
    assert config.max_length == 64
    assert config.resume == "latest"  # bare --resume
    assert load_config(["--resume", "runs/x/checkpoints/step-00000010"]).resume == "runs/x/checkpoints/step-00000010"
    assert load_config([]).resume is None


# --- save / load -------------------------------------------------------------------------------


def test_save_and_config_from_file_round_trip(tmp_path):
    config = TrainConfig(
        model="/models/tiny", from_scratch=True, model_overrides={"num_hidden_layers": 2, "hidden_act": "gelu"},
        labels=["neg", "pos"], max_length=64, epochs=3, seed=5, debug=True,
    )
    assert config.lr is None
    path = tmp_path / "config.yaml"
    config.save(path)
    saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert saved["lr"] == DEFAULT_LR_FROM_SCRATCH  # the effective lr is written, not null
    assert "debug" not in saved and "dry_run" not in saved
    assert set(saved) == set(FIELD_NAMES) - set(NOT_SAVED)

    loaded = config_from_file(path)
    assert loaded.lr == DEFAULT_LR_FROM_SCRATCH
    assert loaded.effective_lr == config.effective_lr
    expected = dataclasses.replace(config, lr=DEFAULT_LR_FROM_SCRATCH, debug=False)
    assert loaded == expected
    # A saved config is itself a valid --config file.
    assert load_config(["--config", str(path)]) == expected


def test_save_writes_unicode_labels_readably(tmp_path):
    config = TrainConfig(labels=["부정", "긍정"])
    path = tmp_path / "config.yaml"
    config.save(path)
    assert "부정" in path.read_text(encoding="utf-8")
    assert config_from_file(path).labels == ["부정", "긍정"]


def test_config_from_file_ignores_unknown_keys(tmp_path):
    # Older or newer runs may have written keys this version does not know.
    path = write_yaml(tmp_path / "config.yaml", {"epochs": 4, "some_future_key": 1})
    assert config_from_file(path) == TrainConfig(epochs=4)


# --- --help ------------------------------------------------------------------------------------


def test_help_lists_every_field_with_its_docstring():
    text = build_parser("trainer_pkg.train", "Fine-tune.").format_help()
    docs = field_docs()
    assert set(docs) == set(FIELD_NAMES), set(FIELD_NAMES) ^ set(docs)
    squashed = "".join(text.split())
    for name in FIELD_NAMES:
        assert f"--{name}" in text, name
        assert docs[name], name
        assert "".join(docs[name].split()) in squashed, name
    assert "--config" in text


# --- the command line end to end ---------------------------------------------------------------


def test_cli_bad_flag_prints_one_line_and_exits_2():
    env = {k: v for k, v in os.environ.items() if k not in ("TRAINER_PKG_DEBUG", "RANK")}
    result = subprocess.run(
        [sys.executable, "-m", "trainer_pkg.train", "--epochs", "0", "--lrr", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "'lrr'" in lines[0] and "did you mean 'lr'" in lines[0]

"""Every launcher config and cluster script is valid: accelerate parses each config, each names
its own launch command, DeepSpeed leaves what trainer_pkg owns to "auto" (and a DeepSpeed file
that fixes its own precision beside a config that names one is refused in one line), scripts pass
bash -n and shellcheck. tests/test_launch_matrix.py runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from conftest import REPO

pytestmark = pytest.mark.fast  # make test-fast

CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
OWNED_BY_TRAINER_PKG = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                        "gradient_clipping")


def test_the_expected_configs_exist():
    names = {path.stem for path in CONFIGS}
    assert {"single_gpu", "multi_gpu", "multi_node", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3",
            "deepspeed_zero3_offload", "cpu_multi_process"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_parses_the_config_and_its_header_names_the_command(path: Path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    header = path.read_text().split("compute_environment")[0]
    assert f"accelerate launch --config_file accelerate_configs/{path.name}" in header
    raw = yaml.safe_load(path.read_text())
    if raw["distributed_type"] == "DEEPSPEED":
        json_path = REPO / raw["deepspeed_config"]["deepspeed_config_file"]
        ds = json.loads(json_path.read_text())
        for key in OWNED_BY_TRAINER_PKG:
            assert ds[key] == "auto", (json_path.name, key)
        assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
        stage = int(path.stem.split("zero")[1][0])
        assert ds["zero_optimization"]["stage"] == stage
        if stage == 3:
            # Without it the final model cannot be gathered into one HF directory.
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash(path: Path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_are_shellcheck_clean():
    result = subprocess.run(["shellcheck", "-x", "-P", "SCRIPTDIR", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_a_deepspeed_file_that_fixes_its_precision_beside_a_config_that_names_one_is_one_line(tmp_path, monkeypatch):
    from trainer_pkg.distributed import let_the_config_fill_precision
    from trainer_pkg.errors import UserError

    ds_file = tmp_path / "mine.json"
    ds_file.write_text(json.dumps({"bf16": {"enabled": "auto"}, "fp16": {"enabled": True}}))
    # What `accelerate launch` exports for a config file with deepspeed_config and mixed_precision.
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", "deepspeed_config_file,zero3_init_flag,mixed_precision")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_file))
    with pytest.raises(UserError, match=r"mine.json sets fp16.enabled .* mixed_precision"):
        let_the_config_fill_precision()

    ds_file.write_text(json.dumps({"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}))
    let_the_config_fill_precision()
    assert os.environ["ACCELERATE_CONFIG_DS_FIELDS"] == "deepspeed_config_file,zero3_init_flag"

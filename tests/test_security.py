"""Security: weights only as safetensors, pickles only through torch.load(weights_only=True), no
remote code, no credentials in logs or saved configs, files written with the user's umask."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_commands, tiny_train_args

PACKAGE = REPO / "trainer_pkg"
TOKEN = "hf_TESTtokenDoNotLeak0123456789abcdef"


def package_sources() -> dict[str, str]:
    return {str(path.relative_to(REPO)): path.read_text(encoding="utf-8") for path in sorted(PACKAGE.rglob("*.py"))}


def test_the_package_loads_nothing_unsafely():
    for name, source in package_sources().items():
        for call in re.finditer(r"torch\.load\(([^)]*)\)", source):
            assert "weights_only=True" in call.group(1), f"{name}: {call.group(0)}"
        assert not re.search(r"\bpickle\.loads?\(", source), f"{name} unpickles"
        assert "trust_remote_code=True" not in source, name
        assert "safe_serialization=False" not in source, name
        # Accelerate reloads registered custom objects with weights_only=False.
        assert "register_for_checkpointing" not in source, name


class RunsCode:
    """A pickle that creates a file when loaded without weights_only=True."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory, tiny_model, tiny_nsmc, cache_env):
    """A run under umask 027 with credentials in the environment."""
    output_dir = tmp_path_factory.mktemp("secure") / "run"
    env = dict(cache_env, HF_TOKEN=TOKEN, HUGGING_FACE_HUB_TOKEN=TOKEN, WANDB_API_KEY=TOKEN)
    args = tiny_train_args(tiny_model, tiny_nsmc, output_dir, "--max_steps", "4", "--save_every", "2")
    result = subprocess.run([sys.executable, "-m", "trainer_pkg.train", *map(str, args)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.umask(0o027))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result


def test_credentials_never_reach_logs_or_saved_configs(guarded_run):
    output_dir, result = guarded_run
    assert TOKEN not in result.stdout and TOKEN not in result.stderr
    for path in output_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_files_get_the_users_umask(guarded_run):
    output_dir, _ = guarded_run
    modes = {str(p.relative_to(output_dir)): p.stat().st_mode & 0o777 for p in [output_dir, *output_dir.rglob("*")]}
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o750 if (output_dir / name).is_dir() else 0o640)}
    assert not wrong, wrong  # umask 027: rw-r----- files, rwxr-x--- directories
    assert "model/model.safetensors" in modes and "checkpoints/step-00000004/model.safetensors" in modes


def test_weights_are_safetensors_only(guarded_run):
    output_dir, _ = guarded_run
    export = sorted(p.name for p in (output_dir / "model").iterdir())
    assert "model.safetensors" in export
    assert not [name for name in export if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], export
    for checkpoint in (output_dir / "checkpoints").glob("step-*"):
        assert (checkpoint / "model.safetensors").is_file() and not (checkpoint / "pytorch_model.bin").exists()


def test_code_in_a_checkpoint_or_a_model_is_never_run(guarded_run, tiny_model, tiny_nsmc, cache_env, tmp_path):
    output_dir, _ = guarded_run
    marker = tmp_path / "code_ran"
    # A checkpoint whose optimizer state is a pickle that runs a command when loaded.
    tampered = tmp_path / "tampered"
    shutil.copytree(output_dir, tampered)
    checkpoint = tampered / "checkpoints" / "step-00000002"
    with (checkpoint / "optimizer.bin").open("wb") as file:
        pickle.dump({"state": RunsCode(marker)}, file)
    # A model directory asking for its own code (auto_map), as a hub repo with custom code would.
    remote_code = tmp_path / "remote_code_model"
    shutil.copytree(output_dir / "model", remote_code)
    config = json.loads((remote_code / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}
    (remote_code / "config.json").write_text(json.dumps(config))
    (remote_code / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")

    results = run_commands({
        "resume": ["trainer_pkg.train", *tiny_train_args(tiny_model, tiny_nsmc, tampered, "--max_steps", "6",
                                                         "--save_every", "2"), "--resume", checkpoint],
        "evaluate": ["trainer_pkg.evaluate", remote_code],
        "predict": ["trainer_pkg.predict", remote_code, "great movie"],
    }, cache_env, tmp_path / "attempts")
    assert not marker.exists(), "code from a checkpoint or a model directory ran"
    resumed = results["resume"]
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    message = resumed.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: {checkpoint}: cannot load the checkpoint (UnpicklingError"), message
    # Without trust_remote_code the auto_map is ignored: the built-in BERT classes load the weights.
    for name in ("evaluate", "predict"):
        assert results[name].returncode == 0 and "Traceback" not in results[name].stderr, results[name].stderr[-3000:]

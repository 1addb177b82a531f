"""--compile: compiled once for all batch lengths, and invisible in checkpoints and the export."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_module, tiny_train_args
from safetensors.torch import load_file

NO_DROPOUT = "hidden_dropout_prob=0,attention_probs_dropout_prob=0"


def test_compile_trains_like_eager_and_exports_plain_names(tiny_model, tiny_nsmc, tmp_path, cache_env):
    pytest.importorskip("torch._inductor")
    curves, exports = {}, {}
    for compiled in (False, True):
        output_dir = tmp_path / f"compile_{compiled}"
        args = tiny_train_args(tiny_model, tiny_nsmc, output_dir, "--model_overrides", NO_DROPOUT, "--log_every", "4",
                               "--max_steps", "12", "--compile", str(compiled).lower())
        # Count every recompilation: batches of many different lengths must not each compile anew.
        env = {**cache_env, "TORCH_LOGS": "recompiles"}
        result = run_module("trainer_pkg.train", *args, env=env)
        records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
        curves[compiled] = [r["loss"] for r in records if r["kind"] == "train"]
        exports[compiled] = load_file(output_dir / "model" / "model.safetensors")
        if compiled:
            recompiles = result.stderr.count("Recompiling function")
            assert recompiles <= 2, result.stderr[-3000:]
    assert curves[True] == pytest.approx(curves[False], rel=1e-4)
    assert set(exports[True]) == set(exports[False])  # no "_orig_mod." prefixes
    assert all(torch.allclose(exports[True][k], exports[False][k], atol=1e-4) for k in exports[False])

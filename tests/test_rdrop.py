"""R-Drop (--rdrop_alpha): the batch runs twice in one forward, and the loss adds the symmetric KL
between the two halves' predictions. Without dropout the two halves are the same rows, so the loss
must be the plain cross-entropy (a misaligned half or label would show); with dropout the KL term
is what the loss adds."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import run_module, tiny_train_args
from helpers_tiny import small_encoder
from test_distributed import accelerate_launch, launch, needs_deepspeed

from trainer_pkg.config import TrainConfig
from trainer_pkg.errors import UserError
from trainer_pkg.loop import TrainStep


def training_loss(model, batch, rdrop_alpha: float, seed: int = 0) -> float:
    config = replace(TrainConfig(), rdrop_alpha=rdrop_alpha)
    # TrainStep.forward needs only the model and the config; the device is for its non-finite watch.
    step = TrainStep(SimpleNamespace(device=torch.device("cpu")), model, None, None, config, 1, False, None)
    torch.manual_seed(seed)
    loss = step.forward(batch).item()
    assert "labels" in batch  # the caller's batch is left as it was (the meter reads its labels)
    return loss


@pytest.mark.fast
def test_without_dropout_the_rdrop_loss_is_the_cross_entropy():
    model, batch = small_encoder("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.train()
    plain = model(**batch).loss.item()
    assert training_loss(model, batch, rdrop_alpha=1.0) == pytest.approx(plain, rel=1e-5)


@pytest.mark.fast
def test_with_dropout_the_loss_adds_the_weighted_disagreement_of_the_two_passes():
    model, batch = small_encoder("bert", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model.train()
    # The same seed gives both calls the same two dropout masks: they differ only in the KL term.
    with_kl = training_loss(model, batch, rdrop_alpha=1.0)
    weighted = training_loss(model, batch, rdrop_alpha=5.0)
    cross_entropy_only = training_loss(model, batch, rdrop_alpha=1e-12)
    kl = with_kl - cross_entropy_only
    assert kl > 1e-6
    assert weighted - cross_entropy_only == pytest.approx(5 * kl, rel=0.02)  # float32 losses near 0.7


@pytest.mark.fast
def test_a_negative_rdrop_alpha_is_refused():
    with pytest.raises(UserError, match="rdrop_alpha"):
        replace(TrainConfig(), rdrop_alpha=-1.0).validate()


# One process; DDP over gloo; DeepSpeed ZeRO-3, whose hooks gather the partitioned weights around
# the one forward over the doubled batch.
LAUNCHES = [pytest.param(None, 1, id="1proc"), pytest.param("cpu_multi_process.yaml", 2, id="ddp-2proc"),
            pytest.param("deepspeed_zero3.yaml", 2, id="deepspeed_zero3-2proc", marks=needs_deepspeed)]


@pytest.mark.parametrize("launcher,processes", LAUNCHES)
def test_a_run_with_rdrop_trains_and_exports(tiny_model, tiny_nsmc, cache_env, tmp_path, launcher, processes):
    output_dir = tmp_path / "run"
    args = tiny_train_args(tiny_model, tiny_nsmc, output_dir, "--max_steps", "45", "--rdrop_alpha", "1",
                           "--per_device_batch_size", str(16 // processes))
    if launcher is None:
        run_module("trainer_pkg.train", *args, env=cache_env)
    else:
        launch(accelerate_launch(launcher, "--num_processes", str(processes)), "trainer_pkg.train", *args, env=cache_env)
    plan = next(record for record in map(json.loads, (output_dir / "log.jsonl").read_text().splitlines())
                if record["kind"] == "plan")
    assert (plan["num_processes"], plan["global_batch_size"], plan["rdrop_alpha"]) == (processes, 16, 1.0)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.9, metrics["test"]
    assert (output_dir / "model" / "model.safetensors").is_file()

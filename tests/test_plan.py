"""The training plan: the global batch is the recipe's on any number of processes; the hardware
only splits it. Explicit flags win; contradictory ones are refused in one line."""

from __future__ import annotations

import math

import pytest

import trainer_pkg.config as recipe
from trainer_pkg.config import config_from_file, load_config
from trainer_pkg.errors import UserError
from trainer_pkg.plan import MICRO_BATCH_LIMIT, make_plan, pretrained_lr, resolve_batch, resolve_schedule

pytestmark = pytest.mark.fast  # make test-fast


def global_batch(config, processes: int) -> int:
    return config.per_device_batch_size * processes * config.grad_accum


def planned(args: list[str], device: str, processes: int, num_rows: int = 10_000, width: int | None = None):
    """The config resolved for a corpus of `num_rows` rows, as a run's loader batches it."""
    batched = resolve_batch(load_config(args), device, processes)
    return resolve_schedule(batched, math.ceil(num_rows / batched.per_device_batch_size), processes, width)


@pytest.mark.parametrize("from_scratch", [False, True])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_default_global_batch_and_lr_do_not_depend_on_the_launch(from_scratch, device):
    args = ["--from_scratch"] if from_scratch else []
    expected_batch = recipe.DEFAULT_GLOBAL_BATCH_FROM_SCRATCH if from_scratch else recipe.DEFAULT_GLOBAL_BATCH_PRETRAINED
    expected_lr = recipe.DEFAULT_LR_FROM_SCRATCH if from_scratch else recipe.DEFAULT_LR_PRETRAINED
    for processes in (1, 2, 4, 8, 16, 32):
        resolved = planned(args, device, processes)
        assert global_batch(resolved, processes) == expected_batch, processes
        assert resolved.lr == pytest.approx(expected_lr)
    # More processes than rows in the recipe's batch: one row each, the lr scaled to that batch, and the plan says so.
    crowded = planned(args, device, 2 * expected_batch)
    assert (crowded.per_device_batch_size, crowded.grad_accum) == (1, 1)
    assert crowded.lr == pytest.approx(expected_lr * math.sqrt(2))
    plan = make_plan(crowded, device, 2 * expected_batch, num_train_rows=10_000, num_batches=10_000)
    assert any(f"more processes ({2 * expected_batch}) than rows" in note for note in plan.notes)


def test_a_global_batch_larger_than_a_device_pass_is_accumulated():
    resolved = resolve_batch(load_config(["--global_batch_size", "256"]), "cpu", 1)
    assert (resolved.per_device_batch_size, resolved.grad_accum) == (MICRO_BATCH_LIMIT["cpu"], 256 // MICRO_BATCH_LIMIT["cpu"])
    on_gpus = resolve_batch(load_config(["--global_batch_size", "4096"]), "cuda", 2)
    assert (on_gpus.per_device_batch_size, on_gpus.grad_accum) == (512, 4)
    # sqrt rule for a global batch other than the recipe's.
    assert planned(["--global_batch_size", "256"], "cpu", 1).lr == \
        pytest.approx(recipe.DEFAULT_LR_PRETRAINED * math.sqrt(256 / recipe.DEFAULT_GLOBAL_BATCH_PRETRAINED))


def test_explicit_per_device_batch_keeps_its_classic_meaning_and_explicit_lr_wins(tmp_path):
    # Global = per device x processes x accumulation: 16 x 2 x 8 = 256.
    resolved = planned(["--per_device_batch_size", "16", "--grad_accum", "8"], "cpu", 2)
    assert global_batch(resolved, 2) == 256
    assert resolved.lr == pytest.approx(recipe.DEFAULT_LR_PRETRAINED * math.sqrt(256 / recipe.DEFAULT_GLOBAL_BATCH_PRETRAINED))
    assert planned(["--lr", "3e-4", "--per_device_batch_size", "512"], "cpu", 1, num_rows=10**6).lr == 3e-4
    # Per device and global together: the accumulation that makes them agree.
    both = resolve_batch(load_config(["--per_device_batch_size", "8", "--global_batch_size", "64"]), "cpu", 2)
    assert both.grad_accum == 4
    # What a run saves is resolved: a resume on other hardware keeps the batch it started with.
    resolved.save(tmp_path / "config.yaml")
    again = resolve_batch(config_from_file(tmp_path / "config.yaml"), "cuda", 2)
    assert (again.per_device_batch_size, again.grad_accum, again.lr) == (16, 8, pytest.approx(resolved.lr))


def test_the_pretrained_lr_follows_the_encoder_width_within_bounds(tiny_model):
    from trainer_pkg.model import encoder_width

    assert pretrained_lr(768) == recipe.DEFAULT_LR_PRETRAINED  # BERT-base, the reference job
    assert pretrained_lr(384) == pytest.approx(2 * recipe.DEFAULT_LR_PRETRAINED)  # MiniLM, measured
    assert pretrained_lr(1024) == pytest.approx(recipe.DEFAULT_LR_PRETRAINED * 768 / 1024)
    assert pretrained_lr(128) == pretrained_lr(384) and pretrained_lr(4096) == pretrained_lr(1536)  # not extrapolated
    assert pretrained_lr(None) == recipe.DEFAULT_LR_PRETRAINED
    # The width is read from the model's config; the sqrt rule applies on top; --lr and --from_scratch ignore it.
    config = load_config(["--model", str(tiny_model), "--global_batch_size", "128"])
    assert encoder_width(config) == 32
    resolved = resolve_schedule(resolve_batch(config, "cpu", 1), 100, 1, encoder_width(config))
    assert resolved.lr == pytest.approx(pretrained_lr(32) * math.sqrt(128 / recipe.DEFAULT_GLOBAL_BATCH_PRETRAINED))
    assert encoder_width(load_config(["--model", str(tiny_model), "--lr", "1e-5"])) is None
    assert encoder_width(load_config(["--model", str(tiny_model), "--from_scratch"])) is None
    assert planned(["--from_scratch"], "cpu", 1, width=384).lr == recipe.DEFAULT_LR_FROM_SCRATCH


def test_a_long_pretrained_run_takes_a_smaller_lr_on_any_number_of_processes():
    long_lr, minilm = recipe.DEFAULT_LONG_RUN_LR_PRETRAINED, 384
    assert long_lr < pretrained_lr(minilm) and long_lr < pretrained_lr(768)
    # Full SST-2 (67,349 rows): 2 epochs of 2,105 steps at batch 32 see 134,698 rows.
    one = planned([], "cpu", 1, num_rows=67_349, width=minilm)
    assert (one.epochs, one.lr) == (2, pytest.approx(long_lr))
    # 8 GPUs split the same batch (4 rows each): the same plan.
    assert planned([], "cuda", 8, num_rows=67_349, width=minilm).lr == pytest.approx(long_lr)
    # 64 GPUs, one row each: global 64, the same rows seen, the capped lr scaled by sqrt(64 / 32).
    crowded = planned([], "cuda", 64, num_rows=67_349, width=minilm)
    assert (crowded.epochs, crowded.lr) == (2, pytest.approx(long_lr * math.sqrt(2)))
    # 16,000 rows (the benchmark's): 2 epochs see 32,000 rows, and the width's lr stays.
    short = planned([], "cpu", 1, num_rows=16_000, width=minilm)
    assert (short.epochs, short.lr) == (2, pytest.approx(pretrained_lr(minilm)))
    # The rows the run will see, not the corpus: --max_steps 500 of full SST-2 is a short run.
    assert planned(["--max_steps", "500"], "cpu", 1, num_rows=67_349, width=minilm).lr == pytest.approx(pretrained_lr(minilm))
    # The cap only lowers: a wide encoder whose own lr is under it keeps its own.
    assert planned([], "cpu", 1, num_rows=10**6, width=4096).lr == pytest.approx(min(long_lr, pretrained_lr(4096)))
    assert planned(["--lr", "1e-4"], "cpu", 1, num_rows=10**6, width=minilm).lr == 1e-4
    assert planned(["--from_scratch"], "cpu", 1, num_rows=10**6).lr == recipe.DEFAULT_LR_FROM_SCRATCH


def test_a_long_pretrained_run_trains_with_rdrop_on_any_number_of_processes():
    alpha, minilm = recipe.DEFAULT_LONG_RUN_RDROP_ALPHA_PRETRAINED, 384
    assert alpha > 0
    # Full SST-2 on 1 process, 2, 8 or 64 GPUs: the same rows seen, so the same R-Drop.
    for device, processes in (("cpu", 1), ("cpu", 2), ("cuda", 8), ("cuda", 64)):
        assert planned([], device, processes, num_rows=67_349, width=minilm).rdrop_alpha == alpha
    # The benchmark's 16,000 rows, a run cut short by --max_steps, and a from-scratch run keep it off.
    assert planned([], "cpu", 1, num_rows=16_000, width=minilm).rdrop_alpha == 0
    assert planned(["--max_steps", "500"], "cpu", 1, num_rows=67_349, width=minilm).rdrop_alpha == 0
    assert planned(["--from_scratch"], "cpu", 1, num_rows=10**6).rdrop_alpha == 0
    # Explicit values win either way.
    assert planned(["--rdrop_alpha", "0"], "cpu", 1, num_rows=67_349, width=minilm).rdrop_alpha == 0
    assert planned(["--rdrop_alpha", "0.5"], "cpu", 1, num_rows=16_000, width=minilm).rdrop_alpha == 0.5
    # The plan a run prints and --dry_run's JSON carry it.
    config = planned([], "cpu", 1, num_rows=67_349, width=minilm)
    assert make_plan(config, "cpu", 1, 67_349, math.ceil(67_349 / 32)).to_dict()["rdrop_alpha"] == alpha


def test_contradictory_batch_flags_are_refused_in_one_line():
    contradiction = r"--global_batch_size 100 is not --per_device_batch_size 8 x 2 processes x --grad_accum 4"
    with pytest.raises(UserError, match=contradiction):
        resolve_batch(load_config(["--per_device_batch_size", "8", "--grad_accum", "4", "--global_batch_size", "100"]),
                      "cpu", 2)
    with pytest.raises(UserError, match=r"--global_batch_size 100 cannot be split into --per_device_batch_size 8"):
        resolve_batch(load_config(["--per_device_batch_size", "8", "--global_batch_size", "100"]), "cpu", 2)
    with pytest.raises(UserError, match="need dry_run"):
        load_config(["--assume_processes", "8"])
    with pytest.raises(UserError, match="assume_device must be cpu or cuda"):
        load_config(["--dry_run", "--assume_device", "tpu"])


@pytest.mark.parametrize("batches_per_epoch", [40, 400, 499, 500, 2105, 50_000])
def test_pretrained_runs_take_the_fewest_epochs_that_reach_the_minimum_steps(batches_per_epoch):
    for processes in (1, 2, 8):
        resolved = resolve_batch(load_config([]), "cpu", processes)
        # The same corpus in the same global batches: the same epochs on any number of processes.
        epochs = resolve_schedule(resolved, batches_per_epoch * processes, processes).epochs
        expected = min(recipe.DEFAULT_MAX_EPOCHS_PRETRAINED, max(recipe.DEFAULT_MIN_EPOCHS_PRETRAINED, math.ceil(
            recipe.DEFAULT_MIN_STEPS_PRETRAINED / batches_per_epoch)))
        assert epochs == expected, processes
        assert epochs == 2 or (epochs - 1) * batches_per_epoch < recipe.DEFAULT_MIN_STEPS_PRETRAINED
    assert planned(["--from_scratch"], "cpu", 1).epochs == recipe.DEFAULT_EPOCHS_FROM_SCRATCH
    assert planned(["--epochs", "5"], "cpu", 1).epochs == 5


def test_the_plan_counts_steps_as_accelerate_shards_batches_and_says_when_gpus_starve():
    resolved = resolve_schedule(resolve_batch(load_config([]), "cuda", 8), 250, 8)
    # 1,000 rows in batches of 4 per GPU: 250 batches, 32 rounds of 8 GPUs (the last one completed).
    plan = make_plan(resolved, "cuda", 8, num_train_rows=1000, num_batches=250)
    assert plan.per_device_batch_size == recipe.DEFAULT_GLOBAL_BATCH_PRETRAINED // 8
    assert plan.steps_per_epoch == math.ceil(250 / 8)
    assert plan.total_steps == plan.steps_per_epoch * recipe.DEFAULT_MAX_EPOCHS_PRETRAINED
    assert plan.warmup_steps == round(plan.total_steps * 0.06)
    assert any("per GPU per forward pass" in note for note in plan.notes)
    on_cpu = resolve_schedule(resolve_batch(load_config([]), "cpu", 1), 32, 1)
    assert not any("per GPU per forward pass" in note for note in make_plan(on_cpu, "cpu", 1, 1000, 32).notes)
    capped = make_plan(resolve_schedule(resolve_batch(load_config(["--max_steps", "5"]), "cpu", 1), 32, 1),
                       "cpu", 1, 1000, 32)
    assert capped.total_steps == 5

"""--dry_run: the plan a run will follow, printed with one JSON line last, nothing trained or written;
the plan a real run logs is the same, and it keeps the global batch on any number of processes."""

from __future__ import annotations

import json
import subprocess

import yaml
from conftest import REPO, run_module, tiny_train_args
from test_distributed import accelerate_launch

PLAN_KEYS = {"global_batch_size", "per_device_batch_size", "grad_accum", "lr", "warmup_steps", "steps_per_epoch",
             "total_steps", "epochs", "num_train_rows"}


def dry_run(env, *args) -> dict:
    result = run_module("trainer_pkg.train", *args, "--dry_run", env=env)
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    assert PLAN_KEYS <= set(plan), set(plan)
    # The table a person reads shows the same plan, a row per setting.
    rows = {line.strip("│┃ ").split()[0]: line for line in result.stderr.splitlines() if line.startswith("│")}
    for key in PLAN_KEYS:
        assert key in rows, result.stderr
        if isinstance(plan[key], int):
            assert f"{plan[key]:,}" in rows[key], rows[key]
    return plan


def default_batch_args(model, data, output_dir, *extra) -> list[str]:
    """The tiny run's arguments without its batch flag: the recipe's global batch."""
    args = tiny_train_args(model, data, output_dir, *extra)
    at = args.index("--per_device_batch_size")
    return args[:at] + args[at + 2:]


def launch(env, *args) -> subprocess.CompletedProcess:
    """trainer_pkg.train under accelerate launch with the 2-process CPU config."""
    command = [*accelerate_launch("cpu_multi_process.yaml", "--num_processes", "2"), "-m", "trainer_pkg.train", *args]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_dry_run_prints_the_plan_and_writes_nothing(tiny_model, tiny_nsmc, cache_env, tmp_path):
    output_dir = tmp_path / "never"
    plan = dry_run(cache_env, *default_batch_args(tiny_model, tiny_nsmc, output_dir))
    assert not output_dir.exists()
    # 1,200 rows less 200 carved for validation, from scratch: the recipe's batch of 64 in one pass.
    assert plan["num_train_rows"] == 1000
    assert (plan["global_batch_size"], plan["per_device_batch_size"], plan["grad_accum"]) == (64, 64, 1)
    assert plan["steps_per_epoch"] == 16 and plan["epochs"] == 1 and plan["total_steps"] == 16
    assert plan["warmup_steps"] == round(16 * 0.06)

    # Planning 8 or 64 GPUs: the same global batch and lr; only its split changes, and the plan says
    # when the GPUs get too few rows.
    for processes, per_device in ((8, 8), (64, 1)):
        other = dry_run(cache_env, *default_batch_args(tiny_model, tiny_nsmc, output_dir), "--assume_processes",
                        str(processes), "--assume_device", "cuda")
        assert (other["num_processes"], other["device"]) == (processes, "cuda")
        assert (other["global_batch_size"], other["per_device_batch_size"], other["lr"]) == (64, per_device, plan["lr"])
        assert other["total_steps"] == plan["total_steps"]
        assert any("per GPU per forward pass" in note for note in other["notes"])
    accumulated = dry_run(cache_env, *default_batch_args(tiny_model, tiny_nsmc, output_dir, "--global_batch_size", "256"))
    assert (accumulated["per_device_batch_size"], accumulated["grad_accum"]) == (64, 4)


def test_the_plan_a_run_logs_is_its_dry_run_with_one_and_two_processes(tiny_model, tiny_nsmc, cache_env, tmp_path):
    args = default_batch_args(tiny_model, tiny_nsmc, tmp_path / "run", "--report_to", "none")
    planned = {processes: dry_run(cache_env, *args, "--assume_processes", str(processes)) for processes in (1, 2)}
    assert planned[1]["global_batch_size"] == planned[2]["global_batch_size"] == 64
    assert planned[2]["per_device_batch_size"] == 32
    for processes in (1, 2):
        output_dir = tmp_path / f"run{processes}"
        run_args = [*args[:args.index("--output_dir")], "--output_dir", str(output_dir),
                    *args[args.index("--output_dir") + 2:]]
        if processes == 1:
            run_module("trainer_pkg.train", *run_args, env=cache_env)
        else:
            launch(cache_env, *run_args)
        records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]
        logged = next(record for record in records if record["kind"] == "plan")
        assert {k: logged[k] for k in planned[processes]} == planned[processes]
        # The saved run config is the resolved one: the epochs and lr wait for the corpus.
        saved = yaml.safe_load((output_dir / "run_config.yaml").read_text(encoding="utf-8"))
        assert (saved["epochs"], saved["lr"]) == (planned[processes]["epochs"], planned[processes]["lr"])
        # The whole epoch: the steps Accelerate's sharded loader really gave are the planned ones.
        steps = json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))["optimizer_steps"]
        assert steps == planned[processes]["total_steps"] == planned[processes]["steps_per_epoch"] == 16
    # The dry run under the launcher plans once, for the processes it was launched with.
    launched = launch(cache_env, *args, "--dry_run")
    lines = [line for line in launched.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0]) == planned[2], launched.stdout

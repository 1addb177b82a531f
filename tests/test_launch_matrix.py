"""Every launch path we ship, run: each accelerate_configs/ file with 1 and with 2 processes on the
CPU, in the precision the config asks for, a tiny from-scratch run from training to the export.

The cells run two at a time (torchrun gives each process one thread); each test reads one cell's
outcome, so a failure names its config and process count."""

from __future__ import annotations

import importlib.util
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, tiny_train_args
from safetensors.torch import load_file
from test_distributed import accelerate_launch

pytestmark = pytest.mark.slow

CONFIGS = sorted(path.name for path in (REPO / "accelerate_configs").glob("*.yaml"))
CELLS = [(config, processes) for config in CONFIGS for processes in (1, 2)]
# The cells a CPU box cannot run, and why. Every other cell runs.
NOT_ON_A_CPU = {
    ("single_gpu.yaml", 2): "one process by definition (distributed_type NO): accelerate launch starts one "
                            "process whatever --num_processes says",
}
# The multi-node template runs as one node of it, the way slurm/train.sh launches each node.
AS_ONE_NODE = {"multi_node.yaml": ("--num_machines", "1", "--machine_rank", "0")}
RUN = ("--max_steps", "2", "--max_train_samples", "64", "--max_eval_samples", "32", "--per_device_batch_size", "8")


def uses_deepspeed(config: str) -> bool:
    return yaml.safe_load((REPO / "accelerate_configs" / config).read_text())["distributed_type"] == "DEEPSPEED"


def cell_id(cell: tuple[str, int]) -> str:
    return f"{Path(cell[0]).stem}-{cell[1]}proc"


def why_not(cell: tuple[str, int]) -> str | None:
    if cell in NOT_ON_A_CPU:
        return NOT_ON_A_CPU[cell]
    if uses_deepspeed(cell[0]) and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    return None


@pytest.fixture(scope="module")
def outcomes(tiny_model, tiny_nsmc, cache_env, tmp_path_factory) -> dict[tuple[str, int], tuple]:
    """{cell: (completed process, output directory)} for every cell that runs here."""
    root = tmp_path_factory.mktemp("launch_matrix")

    def run(cell: tuple[str, int]):
        config, processes = cell
        output_dir = root / cell_id(cell)
        # Its own datasets cache: two cells tokenize at the same time.
        env = {**cache_env, "HF_DATASETS_CACHE": str(root / f"{cell_id(cell)}-cache")}
        command = [*accelerate_launch(config, "--num_processes", str(processes), *AS_ONE_NODE.get(config, ())),
                   "-m", "trainer_pkg.train", *tiny_train_args(tiny_model, tiny_nsmc, output_dir, *RUN)]
        result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        return result, output_dir

    runnable = [cell for cell in CELLS if why_not(cell) is None]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(runnable, pool.map(run, runnable)))


def test_the_cells_left_out_are_real_cells():
    assert set(NOT_ON_A_CPU) <= set(CELLS)


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_the_launch_path_trains_and_exports(cell, outcomes):
    reason = why_not(cell)
    if reason:
        pytest.skip(reason)
    config, processes = cell
    result, output_dir = outcomes[cell]
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    precision = yaml.safe_load((REPO / "accelerate_configs" / config).read_text())["mixed_precision"]
    assert f"{processes} process(es) on cpu, precision {precision}" in output, output[-3000:]
    weights = load_file(output_dir / "model" / "model.safetensors")
    assert weights and all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert (output_dir / "model" / "config.json").is_file()

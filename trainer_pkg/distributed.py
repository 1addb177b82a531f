"""The Accelerator for train/evaluate/predict: placement, precision, process group, DeepSpeed.

Launch modes and what each becomes:
- `python -m ...`: one process, on the GPU if there is one, else the CPU.
- `torchrun`/`accelerate launch` with GPUs: DDP (NCCL), or DeepSpeed when the accelerate config
  says so.
- the same without GPUs: real gloo ranks. `Accelerator()` alone would make N independent
  single-process runs that each do the whole job; `cpu=True` makes them MULTI_CPU ranks.
  DeepSpeed must not get `cpu=True` (Accelerate would silently drop DeepSpeed): it gets an explicit
  gloo process group instead, and DeepSpeed picks its CPU accelerator.
"""

from __future__ import annotations

import importlib.util
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

from trainer_pkg.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
FALLBACK = "launch with accelerate_configs/multi_gpu.yaml (DDP) or plain python instead"


def launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def locate_deepspeed_config() -> None:
    """Let the configs' repo-relative JSON paths work from any working directory."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none" or Path(path).is_file():
        return
    in_repo = REPO_ROOT / path
    if not in_repo.is_file():
        raise UserError(f"DeepSpeed config file not found: {path} (relative to {Path.cwd()}); "
                        "launch from the repository root or give an absolute path")
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(in_repo)


def let_the_config_fill_precision() -> None:
    """Let an accelerate config name mixed_precision beside a DeepSpeed JSON whose precision is "auto".

    Accelerate refuses the pair (it says the JSON's own setting would win) unless the precision
    came from `accelerate launch --mixed_precision`. A JSON that leaves bf16/fp16 "auto" is filled
    from mixed_precision either way, so nothing is ignored and the refusal only breaks the
    documented `accelerate launch --config_file accelerate_configs/deepspeed_*.yaml` command.
    """
    fields = os.environ.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",")
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if "mixed_precision" not in fields or not path or path == "none":
        return
    try:
        ds_config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"DeepSpeed config file {path}: cannot read it as JSON ({error})") from None
    fixed = [dtype for dtype in ("bf16", "fp16") if str(ds_config.get(dtype, {}).get("enabled", "auto")) != "auto"]
    if fixed:
        raise UserError(f"DeepSpeed config file {path} sets {fixed[0]}.enabled and the accelerate config sets "
                        f"mixed_precision: set {fixed[0]}.enabled to \"auto\" or drop mixed_precision from the "
                        "accelerate config")
    os.environ["ACCELERATE_CONFIG_DS_FIELDS"] = ",".join(field for field in fields if field != "mixed_precision")


def resolve_precision(requested: str) -> str | None:
    """'auto': the accelerate config's choice when launched with one, else bf16 where supported."""
    if requested == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            return None
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16"
        return "no"
    if requested == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed_precision fp16 needs a GPU; use bf16 or no on the CPU")
    return requested


def make_accelerator(mixed_precision: str = "auto", grad_accum: int = 1, timeout_s: int = 1800,
                     trackers: list[str] | None = None, tracking_dir: str | None = None) -> Accelerator:
    """The job's Accelerator; `trackers` (Accelerate names) log under `tracking_dir`."""
    cuda = torch.cuda.is_available()
    deepspeed = deepspeed_requested()
    if deepspeed:
        locate_deepspeed_config()
        let_the_config_fill_precision()
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(f"the accelerate config asks for DeepSpeed, which is not installed: "
                            f"pip install 'trainer_pkg[deepspeed]', or {FALLBACK}")
        if not cuda and "LOCAL_RANK" not in os.environ:
            raise UserError("DeepSpeed without a GPU needs a launcher (accelerate launch or torchrun); "
                            f"or {FALLBACK}")
    if cuda:
        # TF32 matmuls: free speed on Ampere+ for the fp32 parts of the model.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    process_group = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))
    if deepspeed and not cuda:
        process_group.backend = "gloo"
    accelerator = Accelerator(
        cpu=not cuda and not deepspeed,
        mixed_precision=resolve_precision(mixed_precision),
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=[process_group],
        # A blocking copy to the GPU waits for the stream to drain: one host sync per batch. The
        # loaders pin their batches (trainer_pkg.data), so the copies can be asynchronous.
        dataloader_config=DataLoaderConfiguration(non_blocking=cuda),
        log_with=trackers or None,
        project_dir=tracking_dir if trackers else None,
    )
    if launched_processes() > 1 and accelerator.num_processes != launched_processes():
        raise UserError(
            f"launched as {launched_processes()} processes but the process group has {accelerator.num_processes}: "
            "refusing to run the job several times over; check the launcher and accelerate config"
        )
    return accelerator


def fill_deepspeed_config(accelerator: Accelerator, max_grad_norm: float) -> None:
    """Fill the DeepSpeed settings trainer_pkg owns (left "auto" in accelerate_configs/deepspeed)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = max_grad_norm


def end_processes(accelerator: Accelerator) -> None:
    """Tear the process group down on every rank at once, after the main process has written its files.

    A rank that leaves early can fail in its teardown, and the launcher then kills the ranks still
    working: the barrier keeps the main process's report from being cut off (docs/distributed.md).
    """
    accelerator.wait_for_everyone()
    accelerator.end_training()

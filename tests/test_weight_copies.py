"""bf16 Linear weights cast once per optimizer step (trainer_pkg/weight_copies.py) compute exactly
what bf16 autocast's per-forward casts do, and launch none of those casts.

The CPU has bf16 autocast with the same cast rules for Linear layers as CUDA, so the numbers are
checked here; on a GPU (benchmarks/gpu_session.sh runs this file there) the CUDA case runs too,
and the time saved is measured by benchmarks/step_sweep.py --with_casts.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import run_module, tiny_train_args
from helpers_tiny import small_encoder
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from trainer_pkg.model import CHECKED_ENCODER_TYPES
from trainer_pkg.weight_copies import LowPrecisionWeights


def train_steps(model, batch, cast_once: bool, steps: int = 2, micro_batches: int = 2):
    """`steps` AdamW steps of `micro_batches` accumulated forwards each, under bf16 autocast on the
    model's device, dropout on. Returns the losses, the gradients of the last step and the final weights."""
    model.train()
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    copies = LowPrecisionWeights(model, optimizer) if cast_once else None
    torch.manual_seed(3)
    losses = []
    for _ in range(steps):
        for _ in range(micro_batches):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = (copies.forward(model, batch) if copies else model(**batch)).loss
            loss.backward()
            if copies:
                copies.move_gradients()
            losses.append(loss.detach())
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, gradients, {name: p.detach().clone() for name, p in model.named_parameters()}


CASES = [("cpu", model_type) for model_type in CHECKED_ENCODER_TYPES] + [
    pytest.param("cuda", "bert", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.mark.parametrize(("device", "model_type"), CASES)
def test_the_same_numbers_as_autocast_bit_for_bit(device, model_type):
    """Losses, accumulated gradients and the weights after two optimizer steps: each step's
    forward must see the weights the previous step wrote, and accumulation must add in fp32."""
    model, batch = small_encoder(model_type, hidden_dropout_prob=0.1)
    model.to(device)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    # The math attention kernel: CUDA's fused attention backward may differ from run to run.
    with sdpa_kernel(SDPBackend.MATH):
        plain = train_steps(copy.deepcopy(model), batch, cast_once=False)
        cast_once = train_steps(copy.deepcopy(model), batch, cast_once=True)
    assert all(torch.equal(a, b) for a, b in zip(plain[0], cast_once[0])), (plain[0], cast_once[0])
    assert plain[1].keys() == cast_once[1].keys()
    different = [name for name in plain[1] if not torch.equal(plain[1][name], cast_once[1][name])]
    assert not different, f"gradients differ: {different}"
    assert all(torch.equal(plain[2][name], cast_once[2][name]) for name in plain[2])
    # The weights moved, so a copy left unrefreshed after the first step would have shown above.
    assert any(not torch.equal(initial[name], plain[2][name]) for name in initial)


class CastCounter(TorchDispatchMode):
    """Counts casts of parameters (fp32 weights to bf16), the ops the copies exist to remove."""

    def __init__(self, parameters):
        super().__init__()
        self.parameter_ids = {id(p) for p in parameters}
        self.casts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._to_copy and id(args[0]) in self.parameter_ids:
            self.casts[args[0].dtype] += 1
        return func(*args, **(kwargs or {}))


def test_no_parameter_is_cast_in_the_forward_or_backward():
    model, batch = small_encoder("bert")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    results = {}
    for cast_once in (False, True):
        copies = LowPrecisionWeights(model, optimizer) if cast_once else None
        counter = CastCounter(model.parameters())
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (copies.forward(model, batch) if copies else model(**batch)).loss
            loss.backward()
        results[cast_once] = sum(counter.casts.values())
        model.zero_grad(set_to_none=True)
    linear_tensors = sum(2 for m in model.modules() if type(m) is torch.nn.Linear)
    assert results[False] >= linear_tensors  # autocast casts every Linear weight and bias ...
    assert results[True] == 0  # ... the copies none of them


def bf16_run(tiny_model, tiny_nsmc, output_dir, cache_env, cast_once: str, *extra: str):
    return run_module("trainer_pkg.train", *tiny_train_args(
        tiny_model, tiny_nsmc, output_dir, "--mixed_precision", "bf16", "--max_steps", "8", "--grad_accum", "2",
        "--log_every", "2", "--eval_every", "4", "--cast_weights_once", cast_once, *extra), env=cache_env)


def test_a_run_with_the_copies_writes_the_same_model(tmp_path, tiny_model, tiny_nsmc, cache_env):
    """Two real bf16 training runs on the CPU, with and without the copies (gradient accumulation,
    clipping, a checkpoint and the export on the way), end with identical weights and losses; and
    a run resumed from the first one's checkpoint at step 4 casts the loaded weights, not stale ones."""
    runs = {}
    for cast_once in ("true", "false"):
        output_dir = tmp_path / f"cast_once_{cast_once}"
        result = bf16_run(tiny_model, tiny_nsmc, output_dir, cache_env, cast_once)
        losses = [r["loss"] for r in map(json.loads, (output_dir / "log.jsonl").read_text().splitlines())
                  if r["kind"] == "train"]
        runs[cast_once] = (result.stdout + result.stderr, losses, load_file(output_dir / "model" / "model.safetensors"))
    assert "Linear weights cast to bf16 once per optimizer step" in runs["true"][0]
    assert "once per optimizer step" not in runs["false"][0]
    assert len(runs["true"][1]) == 4 and runs["true"][1] == runs["false"][1]
    with_copies, without = runs["true"][2], runs["false"][2]
    assert with_copies.keys() == without.keys()
    assert all(torch.equal(with_copies[name], without[name]) for name in with_copies)

    resumed = tmp_path / "resumed"
    bf16_run(tiny_model, tiny_nsmc, resumed, cache_env, "true",
             "--resume", str(tmp_path / "cast_once_true" / "checkpoints" / "step-00000004"))
    last = Path("checkpoints") / "step-00000008" / "model.safetensors"
    uninterrupted, continued = load_file(tmp_path / "cast_once_true" / last), load_file(resumed / last)
    assert all(torch.equal(uninterrupted[name], continued[name]) for name in uninterrupted)

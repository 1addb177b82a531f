"""No host sync per training step or evaluation batch (issue 5: "no host synchronisation every step").

A sync makes the CPU wait for the GPU, so it cannot queue the next step's kernels while the GPU
computes; on the H100 the step is bound by the host's kernel launches, so each one costs time.
Syncs are counted by tests/host_sync_probe.py on real runs: every tensor-to-Python conversion by
call site (and on CUDA, every sync the sync-debug mode reports). Two runs that differ only in
their number of steps and evaluation batches must make the same conversions: a site called once
per step or per batch shows up as a difference.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_train_args
from helpers_tiny import SMALL, padded_batch, small_encoder
from transformers import AutoConfig, AutoModelForSequenceClassification

from trainer_pkg.model import CHECKED_ENCODER_TYPES, accepts_prepared_mask, model_inputs


def sync_counts(tmp_path, name, tiny_model, tiny_nsmc, env, steps: int, eval_batch: int) -> dict[str, int]:
    counts = tmp_path / f"{name}.json"
    args = tiny_train_args(tiny_model, tiny_nsmc, tmp_path / name, "--max_steps", str(steps), "--log_every", "1000",
                           "--eval_every", "0", "--save_every", "0", "--eval_batch_size", str(eval_batch))
    result = subprocess.run([sys.executable, str(REPO / "tests" / "host_sync_probe.py"), str(counts), *args],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(counts.read_text(encoding="utf-8"))


def test_no_sync_per_step_or_eval_batch(tmp_path, tiny_model, tiny_nsmc, cache_env):
    few = sync_counts(tmp_path, "few", tiny_model, tiny_nsmc, cache_env, steps=4, eval_batch=64)
    many = sync_counts(tmp_path, "many", tiny_model, tiny_nsmc, cache_env, steps=12, eval_batch=16)
    assert few, "the probe counted nothing: the final log interval and report do read values"
    growing = {site: (few.get(site, 0), count) for site, count in many.items() if count != few.get(site, 0)}
    assert not growing, f"host syncs that grow with steps or evaluation batches (4 -> 12 steps, 5 -> 19 batches): {growing}"


def tiny_classifier(tiny_model, attention: str):
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tiny_model, num_labels=2)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attention)


def same_logits_both_ways(model, batch) -> bool:
    model.eval()
    with torch.no_grad():
        return torch.equal(model(**batch).logits, model(**model_inputs(batch, prepared_mask=True)).logits)


def test_prepared_mask_computes_what_the_padding_mask_does(tiny_model):
    """Same logits, loss and gradients, with dropout on: the 4D mask is the one transformers builds."""
    model = tiny_classifier(tiny_model, "sdpa")
    assert accepts_prepared_mask(model)
    batch = padded_batch(model.config.vocab_size)
    assert model_inputs(batch, prepared_mask=True)["attention_mask"].shape == (4, 1, 16, 16)
    results = []
    for prepared in (False, True):
        torch.manual_seed(3)
        model.zero_grad()
        loss = model(**model_inputs(batch, prepared)).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain_loss, plain_grads), (prepared_loss, prepared_grads) = results
    assert torch.equal(plain_loss, prepared_loss)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, prepared_grads))
    assert same_logits_both_ways(model, batch)
    # The padding matters: without any mask the padded rows score differently.
    assert not torch.equal(model(**batch).logits, model(input_ids=batch["input_ids"]).logits)


def test_eager_attention_keeps_the_padding_mask(tiny_model):
    """Eager attention adds the mask as a float bias: a boolean 4D mask would be wrong there."""
    assert not accepts_prepared_mask(tiny_classifier(tiny_model, "eager"))


@pytest.mark.parametrize("model_type", CHECKED_ENCODER_TYPES)
def test_every_listed_encoder_computes_the_same_with_the_prepared_mask(model_type):
    """The list is checked against the installed transformers: a release that starts using the
    mask elsewhere in one of these models fails here, not silently in training."""
    model, batch = small_encoder(model_type)
    assert accepts_prepared_mask(model)
    assert same_logits_both_ways(model, batch)


def test_an_encoder_that_pools_with_the_mask_keeps_it():
    """ModernBERT's mean pooling reads the 2D mask: the prepared mask would break it."""
    config = AutoConfig.for_model("modernbert", **SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  cls_token_id=1, sep_token_id=2, classifier_pooling="mean")
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    assert not accepts_prepared_mask(model)
    with pytest.raises(RuntimeError):
        same_logits_both_ways(model, padded_batch(100))

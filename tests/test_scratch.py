"""The from-scratch options: the first attention layer's local start and the slower attention
geometry, off by default and set by the offline proxy's config; neither touches pretrained runs,
and the local start says so when a model is not BERT-like."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForSequenceClassification, DistilBertConfig

from trainer_pkg.config import load_config
from trainer_pkg.model import build_model, build_optimizer
from trainer_pkg.scratch import init_local_attention

pytestmark = pytest.mark.fast  # make test-fast


def scratch_config(tiny_model, *extra):
    return load_config(["--model", str(tiny_model), "--from_scratch", *extra])


def first_layer_attention(model, input_ids):
    """Attention probabilities of the first layer, computed from its query/key maps: (batch, head, i, j)."""
    bert = model.base_model
    hidden = bert.embeddings(input_ids=input_ids)
    attention = bert.encoder.layer[0].attention.self
    heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // heads

    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)

    logits = split(attention.query(hidden)) @ split(attention.key(hidden)).transpose(-1, -2) / head_dim ** 0.5
    return logits.softmax(-1)


def mean_attention_at_offset(probabilities, head, offset):
    length = probabilities.shape[-1]
    rows = torch.arange(2, length - 2)
    return probabilities[:, head, rows, rows + offset].mean().item()


def test_local_init_points_heads_at_the_previous_and_next_token(tiny_model):
    torch.manual_seed(0)
    model = build_model(scratch_config(tiny_model, "--scratch_init", "local"), ["negative", "positive"]).eval()
    vocab = model.config.vocab_size
    input_ids = torch.randint(5, vocab, (64, 40))
    with torch.no_grad():
        probabilities = first_layer_attention(model, input_ids)
    # Uniform attention over 40 tokens would give 0.025 to each.
    for head, wanted in ((0, -1), (1, +1)):
        at = {offset: mean_attention_at_offset(probabilities, head, offset) for offset in (-2, -1, 0, 1, 2)}
        assert at[wanted] > 0.2, (head, at)
        assert at[wanted] > 5 * max(value for offset, value in at.items() if offset != wanted), (head, at)


def test_the_default_random_init_keeps_attention_uniform(tiny_model):
    torch.manual_seed(0)
    model = build_model(scratch_config(tiny_model), ["negative", "positive"]).eval()
    input_ids = torch.randint(5, model.config.vocab_size, (64, 40))
    with torch.no_grad():
        probabilities = first_layer_attention(model, input_ids)
    assert max(mean_attention_at_offset(probabilities, head, offset)
               for head in (0, 1) for offset in (-1, 1)) < 0.05


def test_local_init_depends_on_the_seed_only(tiny_model):
    def positions(seed):
        model = build_model(scratch_config(tiny_model, "--scratch_init", "local", "--seed", str(seed)),
                            ["negative", "positive"])
        return model.base_model.embeddings.position_embeddings.weight.detach().clone()

    assert torch.equal(positions(3), positions(3))
    assert not torch.equal(positions(3), positions(4))


def test_from_scratch_keeps_the_models_dropout_and_the_proxy_config_turns_it_off(tiny_model):
    labels = ["negative", "positive"]
    assert json.loads((tiny_model / "config.json").read_text())["hidden_dropout_prob"] == 0.1
    plain = build_model(scratch_config(tiny_model), labels).config
    assert plain.hidden_dropout_prob == 0.1 and plain.attention_probs_dropout_prob == 0.1
    proxy = load_config(["--config", str(REPO / "configs" / "nsmc_proxy_offline.yaml"), "--model", str(tiny_model)])
    assert (proxy.scratch_init, proxy.attention_lr_scale, proxy.lr) == ("local", 0.03, 1e-3)
    built = build_model(proxy, labels).config
    assert built.hidden_dropout_prob == 0.0 and built.attention_probs_dropout_prob == 0.0


def learning_rates(model, optimizer):
    by_id = {id(parameter): group["lr"] for group in optimizer.param_groups for parameter in group["params"]}
    return {name: by_id[id(parameter)] for name, parameter in model.named_parameters()}


def test_attention_lr_scale_slows_the_attention_geometry(tiny_model):
    config = scratch_config(tiny_model, "--lr", "1e-3", "--attention_lr_scale", "0.03")
    model = build_model(config, ["negative", "positive"])
    optimizer = build_optimizer(model, config)
    rates = learning_rates(model, optimizer)
    slow = {name for name, lr in rates.items() if lr == pytest.approx(3e-5)}
    assert "bert.embeddings.position_embeddings.weight" in slow
    assert {f"bert.encoder.layer.{i}.attention.self.{part}.{kind}"
            for i in (0, 1) for part in ("query", "key") for kind in ("weight", "bias")} <= slow
    assert "bert.embeddings.word_embeddings.weight" not in slow
    assert all(lr == pytest.approx(1e-3) for name, lr in rates.items() if name not in slow)
    # Every parameter is in exactly one group, and decay still skips biases and LayerNorm weights.
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(model.parameters()))
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert all((id(p) in decayed) == (p.ndim >= 2) for p in model.parameters())


def test_one_learning_rate_by_default_from_scratch_and_pretrained(tiny_model, tmp_path):
    config = scratch_config(tiny_model, "--lr", "1e-3")
    model = build_model(config, ["negative", "positive"])
    assert set(learning_rates(model, build_optimizer(model, config)).values()) == {1e-3}
    # Fine-tuning pretrained weights: one learning rate, and the weights stay as loaded.
    model.save_pretrained(tmp_path / "pretrained")
    pretrained = load_config(["--model", str(tmp_path / "pretrained"), "--lr", "1e-3"])
    loaded = build_model(pretrained, ["negative", "positive"])
    assert set(learning_rates(loaded, build_optimizer(loaded, pretrained)).values()) == {1e-3}
    assert torch.equal(loaded.base_model.embeddings.position_embeddings.weight,
                       model.base_model.embeddings.position_embeddings.weight)


def test_non_bert_model_keeps_its_init_and_says_so(tmp_path):
    config = DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    assert init_local_attention(model, seed=0) is False
    assert all(torch.equal(before[name], parameter) for name, parameter in model.named_parameters())
    # Through the real entry point, the run is told why its --scratch_init local did nothing.
    config.save_pretrained(tmp_path)
    warnings = []
    built = build_model(load_config(["--model", str(tmp_path), "--from_scratch", "--scratch_init", "local"]),
                        ["negative", "positive"], say=warnings.append)
    assert type(built).__name__ == "DistilBertForSequenceClassification"
    assert len(warnings) == 1 and "DistilBertForSequenceClassification is not a BERT-style encoder" in warnings[0]


def test_bad_scratch_options_are_reported():
    from trainer_pkg.errors import UserError

    with pytest.raises(UserError) as raised:
        load_config(["--scratch_init", "sinusoidal", "--attention_lr_scale", "0"])
    assert "scratch_init must be local or random" in str(raised.value)
    assert "attention_lr_scale must be > 0" in str(raised.value)


def test_resume_refuses_another_attention_lr_scale(tmp_path):
    from trainer_pkg.config import TrainConfig, config_from_file
    from trainer_pkg.run_dir import TrainingState, resume_problem

    # What a checkpoint holds is the resolved configuration, the scale with it.
    TrainConfig(from_scratch=True, attention_lr_scale=0.03).save(tmp_path / "run_config.yaml")
    saved = config_from_file(tmp_path / "run_config.yaml")
    assert saved.attention_lr_scale == 0.03
    state = TrainingState(optimizer_steps=10)
    same = TrainConfig(from_scratch=True, attention_lr_scale=0.03)
    assert resume_problem(saved, state, same, 1, deepspeed=False) is None
    problem = resume_problem(saved, state, TrainConfig(from_scratch=True), 1, deepspeed=False)
    assert "--attention_lr_scale 0.03" in problem

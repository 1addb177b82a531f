"""Two from-scratch options: the first attention layer's start (--scratch_init local), and a
smaller step for the parameters that shape where attention looks (--attention_lr_scale).

Measured on the offline proxy (2-layer, hidden-128 mBERT, one NSMC epoch): with the model's own
random init, attention either stays uniform for the whole epoch (the encoder then works as a bag of
word pieces, ~0.785 test accuracy) or, once the learning rate passes ~2e-3, the first layer's
attention logits grow past 100 within a few hundred steps, the softmax saturates and every gradient
below the pooler vanishes (a constant prediction). Yet NSMC is decided by neighbouring word pieces:
the uncased mBERT tokenizer splits Hangul syllables into jamo pieces, and a linear model over
hashed piece bigrams reaches 0.84 in one epoch where one over single pieces stops at 0.77.

So the proxy's encoder starts with its first layer's heads looking at the previous and the next
token (sinusoidal position embeddings and query/key maps that rotate one position apart, cf.
convolution-like "structured" attention initialisations), and its position embeddings and query/key
weights learn at 3% of the rate, so that this structure is refined rather than overwritten in the
first hundred steps. Everything else is the model's own initialisation, and the result is a
standard model of the same architecture.

They are settings of configs/nsmc_proxy_offline.yaml, not --from_scratch defaults: on a second
model (MiniLM-L6's config on SST-2) neither helped (docs/pretrained.md "From-scratch defaults").
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers import PreTrainedModel

# Names of the parameters that shape where attention looks, in BERT-style models.
ATTENTION_GEOMETRY = ("position_embeddings", ".query.", ".key.")
# Logit margin of the intended neighbour at initialisation: it gets most of a head's attention in a
# 30-piece review while the softmax is still far from saturated.
NEIGHBOUR_LOGIT = 5.0


def attention_geometry_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the position embeddings and attention query/key weights (and biases)."""
    return {id(parameter) for name, parameter in model.named_parameters()
            if any(part in name for part in ATTENTION_GEOMETRY)}


def _bert_like_parts(model: PreTrainedModel):
    """(position embedding, first attention layer) of a BERT-style encoder, else None."""
    base = getattr(model, "base_model", model)
    positions = getattr(getattr(base, "embeddings", None), "position_embeddings", None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    attention = getattr(getattr(layers[0], "attention", None), "self", None) if layers else None
    if not isinstance(positions, torch.nn.Embedding) or attention is None:
        return None
    if not all(isinstance(getattr(attention, name, None), torch.nn.Linear) for name in ("query", "key")):
        return None
    return positions, attention


def _full_shape(parameter: torch.nn.Parameter) -> torch.Size:
    """The parameter's shape, also when ZeRO-3 has partitioned it (its local tensor is then empty)."""
    return getattr(parameter, "ds_shape", parameter.shape)


def _gathered(parameters):
    """Full tensors to write into, also when ZeRO-3 has partitioned them at construction."""
    if any(hasattr(parameter, "ds_id") for parameter in parameters):
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=0)
    return contextlib.nullcontext()


def init_local_attention(model: PreTrainedModel, seed: int) -> bool:
    """Start the first layer's heads on the previous/next token; False when the model is not BERT-like."""
    parts = _bert_like_parts(model)
    if parts is None:
        return False
    positions, attention = parts
    config = model.config
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads
    if hidden % 2 or head_dim % 2 or tuple(_full_shape(attention.query.weight)) != (hidden, hidden):
        return False
    generator = torch.Generator().manual_seed(seed)
    # Frequencies spread over (0, pi), one per stratum with a random offset: sum_k cos(w_k * d) is
    # then sharply peaked at d = 0 (for uniform w its mean is sin(pi d) / (pi d), zero at every other
    # integer), and the jitter leaves the frequencies without a common period.
    pairs = hidden // 2
    strata = torch.arange(pairs, dtype=torch.float64)
    frequencies = (strata + torch.rand(pairs, generator=generator, dtype=torch.float64)) * math.pi / pairs
    table_shape = tuple(_full_shape(positions.weight))
    index = torch.arange(table_shape[0], dtype=torch.float64)[:, None]
    # The same per-dimension scale as the word embeddings, so that neither dominates after LayerNorm.
    amplitude = config.initializer_range * math.sqrt(2)
    table = torch.empty(table_shape, dtype=torch.float64)
    table[:, 0::2] = torch.sin(index * frequencies) * amplitude
    table[:, 1::2] = torch.cos(index * frequencies) * amplitude

    # Head h reads every heads-th frequency pair (a spread over the whole band). Its query is the
    # position (sin, cos) pair as it is; its key rotates each pair by one position, so q_i . k_j is
    # largest at j = i - 1 (even heads) or j = i + 1 (odd heads).
    query = torch.zeros(hidden, hidden, dtype=torch.float64)
    key = torch.zeros(hidden, hidden, dtype=torch.float64)
    pairs_per_head = head_dim // 2
    for head in range(heads):
        shift = 1.0 if head % 2 == 0 else -1.0
        for slot, pair in enumerate(range(head, pairs, heads)[:pairs_per_head]):
            row, column = head * head_dim + 2 * slot, 2 * pair
            cos, sin = math.cos(frequencies[pair] * shift), math.sin(frequencies[pair] * shift)
            query[row, column] = query[row + 1, column + 1] = 1.0
            key[row, column], key[row, column + 1] = cos, sin
            key[row + 1, column], key[row + 1, column + 1] = -sin, cos
    # After the embedding LayerNorm each position coordinate has an RMS of about 1/sqrt(2), so the
    # aligned pairs sum to about pairs_per_head / 2 before the 1/sqrt(head_dim) of attention.
    gain = math.sqrt(NEIGHBOUR_LOGIT * math.sqrt(head_dim) / (pairs_per_head / 2))
    targets = [positions.weight, attention.query.weight, attention.key.weight]
    with _gathered(targets), torch.no_grad():
        for target, value in zip(targets, (table, query * gain, key * gain)):
            target.copy_(value.to(target.dtype))
    return True

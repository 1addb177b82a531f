"""bf16 copies of the Linear weights, cast once per optimizer step instead of in every forward.

Under bf16 autocast each `nn.Linear` casts its fp32 weight and bias to bf16 in every forward, and
the backward casts their gradients back to fp32: in BERT-base about 300 small kernels per
training step, a fifth of all it launches, on a GPU step that the host's kernel launches bound
(docs/performance.md). Here one foreach kernel casts them all when the weights have changed,
the forward runs with the copies in the parameters' places, and one foreach kernel moves
their gradients into the fp32 parameters' `.grad`, where clipping, the optimizer and the
checkpoints find them as before.

The numbers do not change, bit for bit: autocast rounds a weight to bf16 the same way, and a
weight's gradient comes out of the same bf16 matmul either way; only where the casts happen
moves (tests/test_weight_copies.py checks loss and every gradient). It is used only where that
has been checked: a model that Accelerate left unwrapped (a DDP or DeepSpeed wrapper, even of one
process, hooks the fp32 parameters to reduce their gradients during the backward), bf16 autocast,
no --compile (the compiler fuses the casts anyway), and the encoder types of
`model.CHECKED_ENCODER_TYPES`.
"""

from __future__ import annotations

from collections import Counter

import torch

from trainer_pkg.model import CHECKED_ENCODER_TYPES


class LowPrecisionWeights:
    """bf16 copies of a model's Linear weights and biases, refreshed after each optimizer step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        # A parameter reachable under two names is tied to another module, which may use it otherwise.
        uses = Counter(id(parameter) for _, parameter in model.named_parameters(remove_duplicate=False))
        self.slots: list[tuple[torch.nn.Module, str]] = []
        self.parameters: list[torch.nn.Parameter] = []
        for module in model.modules():
            # The exact type: a subclass may use its weight outside F.linear.
            if type(module) is not torch.nn.Linear:
                continue
            for name, parameter in module.named_parameters(recurse=False):
                if parameter.requires_grad and uses[id(parameter)] == 1:
                    self.slots.append((module, name))
                    self.parameters.append(parameter)
        self.copies = [torch.empty_like(p, dtype=torch.bfloat16).requires_grad_() for p in self.parameters]
        self.stale = True
        # The hook runs when the parameters really change: not on the accumulation steps that
        # Accelerate's optimizer wrapper passes over, not on a step skipped as non-finite.
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.register_step_post_hook(lambda *_: self.mark_stale())

    def mark_stale(self) -> None:
        """The fp32 weights changed (an optimizer step): cast again before the next forward."""
        self.stale = True

    def forward(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
        """`model(**inputs)`, computed with the bf16 copies in place of the Linear weights and biases."""
        if self.stale:
            with torch.no_grad():
                torch._foreach_copy_(self.copies, self.parameters)
            self.stale = False
        # What torch.func.functional_call does, without its generality: it walks every submodule
        # several times per call, which costs more host time than the casts this saves.
        for (module, name), weight in zip(self.slots, self.copies):
            module._parameters[name] = weight
        try:
            return model(**inputs)
        finally:
            for (module, name), parameter in zip(self.slots, self.parameters):
                module._parameters[name] = parameter

    def move_gradients(self) -> None:
        """After a backward: the copies' gradients into the fp32 parameters' `.grad` (added to what an
        accumulation window holds there already), in fp32 as autocast's cast would have."""
        fresh, accumulated = ([], []), ([], [])
        for parameter, copy in zip(self.parameters, self.copies):
            if copy.grad is None:
                continue
            if parameter.grad is None:
                parameter.grad = torch.empty_like(parameter)
                fresh[0].append(parameter.grad)
                fresh[1].append(copy.grad)
            else:
                accumulated[0].append(parameter.grad)
                accumulated[1].append(copy.grad)
            copy.grad = None
        if fresh[0]:
            torch._foreach_copy_(*fresh)
        if accumulated[0]:
            torch._foreach_add_(*accumulated)


def low_precision_weights(model: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator,
                          enabled: bool) -> LowPrecisionWeights | None:
    """The copies for this run, or None where they are not known to compute the same (see the module
    doc); `model` as `accelerator.prepare` returned it; `enabled`: asked for and the model not compiled."""
    applies = (enabled and accelerator.mixed_precision == "bf16" and accelerator.unwrap_model(model) is model
               and model.config.model_type in CHECKED_ENCODER_TYPES)
    return LowPrecisionWeights(model, optimizer) if applies else None

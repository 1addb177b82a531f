"""Build the tokenizer, the classifier (pretrained or from its config), optimizer and schedule."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
)
from transformers.utils import logging as transformers_logging

from trainer_pkg.config import TrainConfig
from trainer_pkg.errors import UserError
from trainer_pkg.network import require_download
from trainer_pkg.scratch import attention_geometry_parameters, init_local_attention

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _load_error(what: str, name: str, error: Exception, flag: str) -> UserError:
    if Path(name).exists():
        return UserError(f"cannot load {what} from {name}: {' '.join(str(error).split())[:300]}")
    if name.startswith((".", "/", "~")):
        return UserError(f"{flag} {name}: no such directory")
    return UserError(
        f"cannot load {what} {name!r} from the Hugging Face hub (offline, or no such repo): "
        f"pass {flag} with a local directory (e.g. one saved with save_pretrained)"
    )


def _require_local_or_hub(what: str, name: str, flag: str) -> None:
    if Path(name).exists():
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"{flag} {name}: no such directory")
    # A cached hub download works offline too: only check the network when nothing is cached.
    if try_to_load_from_cache(name, "config.json") is None:
        require_download(what, name, f"pass {flag} with a local directory (e.g. one saved with save_pretrained)")


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    _require_local_or_hub("the tokenizer", name, "--tokenizer/--model")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise _load_error("the tokenizer", name, error, "--tokenizer/--model") from None


def base_model_config(config: TrainConfig) -> PretrainedConfig:
    """The model's config.json with --model_overrides applied."""
    _require_local_or_hub("the model", config.model, "--model")
    try:
        model_config = AutoConfig.from_pretrained(config.model)
    except (OSError, ValueError) as error:
        raise _load_error("the model config", config.model, error, "--model") from None
    for key, value in config.model_overrides.items():
        if not hasattr(model_config, key):
            raise UserError(f"--model_overrides: {type(model_config).__name__} has no field {key!r}")
        setattr(model_config, key, value)
    return model_config


def encoder_width(config: TrainConfig) -> int | None:
    """The pretrained encoder's hidden size, which sets the default lr (plan.pretrained_lr); None
    where the default lr does not depend on it (--lr given, or --from_scratch)."""
    if config.lr is not None or config.from_scratch:
        return None
    return getattr(base_model_config(config), "hidden_size", None)


def load_model_config(config: TrainConfig, labels: list[str]) -> PretrainedConfig:
    model_config = base_model_config(config)
    model_config.num_labels = len(labels)
    model_config.id2label = dict(enumerate(labels))
    model_config.label2id = {name: i for i, name in enumerate(labels)}
    model_config.problem_type = "single_label_classification"
    return model_config


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Without transformers' warnings and progress bars (loading and saving weights): the run's
    console says what happened in its own lines."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        transformers_logging.enable_progress_bar()


def shorten(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def loading_summary(name: str, info: dict) -> str:
    """One line for what transformers reports as a table per checkpoint: which weights are new, which unused."""
    new = sorted(info.get("missing_keys", [])) + sorted(key for key, *_ in info.get("mismatched_keys", []))
    unused = sorted(info.get("unexpected_keys", []))
    line = f"pretrained weights from {name}; newly initialised: {shorten(new) if new else 'none'}"
    return line + (f"; unused from the checkpoint: {shorten(unused)}" if unused else "")


def require_weights(config: TrainConfig) -> None:
    """A local --model without weights is refused unless --from_scratch, before anything is planned
    or written (train.run): a dry run would print a pretrained plan for it, and the run would fail
    only after creating its output directory."""
    local = Path(config.model)
    if not config.from_scratch and local.is_dir() and not any((local / name).exists() for name in WEIGHT_FILES):
        raise UserError(
            f"--model {config.model}: no weights there (model.safetensors or pytorch_model.bin); "
            "pass --from_scratch to train from a random initialisation of its config"
        )


def build_model(config: TrainConfig, labels: list[str], say: Callable[[str], None] = print) -> PreTrainedModel:
    """The classifier: pretrained weights with a new head, or random init with --from_scratch."""
    model_config = load_model_config(config, labels)
    if config.from_scratch:
        try:
            model = AutoModelForSequenceClassification.from_config(model_config, attn_implementation="sdpa")
        except ValueError as error:
            raise UserError(f"--model_overrides: invalid model configuration: {error}") from None
        if config.scratch_init == "local" and not init_local_attention(model, config.seed):
            say(f"--scratch_init local: {type(model).__name__} is not a BERT-style encoder; "
                 "it keeps its own random initialisation")
        return model
    # transformers' own report is a table and a warning per load: one line of ours says the same.
    try:
        with quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                config.model, config=model_config, attn_implementation="sdpa", ignore_mismatched_sizes=False,
                output_loading_info=True,
            )
    except (OSError, ValueError, RuntimeError) as error:
        raise _load_error("model weights", config.model, error, "--model") from None
    say(loading_summary(config.model, info))
    return model


# The BERT-family encoders whose modeling code the two host-time shortcuts are checked against
# (tests/test_host_syncs.py, tests/test_weight_copies.py, per type, under the installed transformers):
# - they use the 2D attention mask only to build the attention bias, with transformers'
#   create_bidirectional_mask, which passes a prepared 4D mask through as it is (others may use it
#   elsewhere too: ModernBERT's mean pooling does);
# - their Linear layers use weight and bias only in their own forward, so a bf16 copy in its place
#   computes what autocast's cast did (trainer_pkg/weight_copies.py).
CHECKED_ENCODER_TYPES = ("albert", "bert", "camembert", "distilbert", "electra", "roberta", "xlm-roberta")


def accepts_prepared_mask(model: PreTrainedModel) -> bool:
    """Whether `model_inputs(..., prepared_mask=True)` computes what the 2D mask does for `model`."""
    modeling = sys.modules.get(type(model).__module__)
    return (model.config.model_type in CHECKED_ENCODER_TYPES
            and getattr(model.config, "_attn_implementation", None) == "sdpa"
            and modeling is not None and "create_bidirectional_mask" in vars(modeling))


def model_inputs(batch: dict[str, torch.Tensor], prepared_mask: bool) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for a collated batch.

    With `prepared_mask`, the 2D padding mask becomes the 4D boolean mask transformers would build
    from it, laid out the same (contiguous), so attention runs the same kernels. Given the 2D mask,
    transformers first asks `padding_mask.all()` in a Python `if` (to drop a mask without padding):
    a host sync on every forward, which stops the CPU from queueing the next step's kernels while
    the GPU works. On a GPU batches are padded to multiples of 8, so a batch without padding is rare and the
    mask is kept for it too.
    """
    if not prepared_mask:
        return batch
    mask = batch["attention_mask"].bool()
    length = mask.shape[1]
    return {**batch, "attention_mask": mask[:, None, None, :].expand(-1, 1, length, -1).contiguous()}


def build_optimizer(model: PreTrainedModel, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and LayerNorm weights (the BERT recipe)."""
    scale = config.attention_lr_scale
    slow = attention_geometry_parameters(model) if scale != 1 else set()
    by_setting: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for parameter in model.parameters():
        if parameter.requires_grad:
            weight_decay = 0.0 if parameter.ndim < 2 else config.weight_decay
            lr = config.effective_lr * (scale if id(parameter) in slow else 1.0)
            by_setting.setdefault((weight_decay, lr), []).append(parameter)
    # The fused kernel (CUDA, and CPU since torch 2.4) is one pass over each parameter instead of
    # several per tensor: the optimizer step over the embedding rows is a large share of a CPU step.
    on_cpu_or_cuda = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    groups = [{"params": params, "weight_decay": weight_decay, "lr": lr} for (weight_decay, lr), params in by_setting.items()]
    return torch.optim.AdamW(groups, lr=config.effective_lr, fused=on_cpu_or_cuda or None,
                             foreach=None if on_cpu_or_cuda else True)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    return get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def load_classifier(path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A trained classifier from an export (<output_dir>/model) or a checkpoint directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"{path}: no such directory (pass an export <output_dir>/model or a checkpoint)")
    if not (directory / "config.json").is_file():
        raise UserError(f"{path}: not a model directory (no config.json); pass <output_dir>/model or a checkpoint")
    if not any((directory / name).exists() for name in WEIGHT_FILES):
        if (directory / "pytorch_model").is_dir():
            raise UserError(f"{path}: a DeepSpeed ZeRO checkpoint (sharded weights); convert it first: "
                            f"python -m trainer_pkg.export {path} EXPORT_DIR")
        raise UserError(f"{path}: no model weights (model.safetensors); was the checkpoint written completely?")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(directory, attn_implementation="sdpa")
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{path}: cannot load the model: {' '.join(str(error).split())[:300]}") from None
    return model, load_tokenizer(str(directory))


def label_names(model: PreTrainedModel) -> list[str]:
    id2label = model.config.id2label
    return [id2label[i] for i in range(len(id2label))]

"""Turn a checkpoint into a standard Hugging Face model directory.

    python -m trainer_pkg.export CHECKPOINT OUTPUT_DIR

Works on every checkpoint trainer_pkg writes, including DeepSpeed ZeRO ones (sharded over the
processes that saved them): their shards are consolidated into one fp32 state dict. The result
loads with `transformers.pipeline("text-classification", model=OUTPUT_DIR)` and with
`trainer_pkg.evaluate`/`predict`, and can seed a new run (`--model OUTPUT_DIR`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import AutoConfig, AutoModelForSequenceClassification

from trainer_pkg.checkpoint import apply_umask
from trainer_pkg.config import ArgParser
from trainer_pkg.errors import UserError, cli
from trainer_pkg.model import WEIGHT_FILES, load_classifier, load_tokenizer
from trainer_pkg.run_dir import CONFIG_FILE, EXPORT_CONFIG_FILE, STATE_FILE

DEEPSPEED_TAG = "pytorch_model"  # the folder Accelerate's save_state gives DeepSpeed's shards


def is_deepspeed_checkpoint(directory: Path) -> bool:
    return (directory / DEEPSPEED_TAG).is_dir() and not any((directory / n).exists() for n in WEIGHT_FILES)


def consolidate(checkpoint: Path):
    """A full model from a DeepSpeed ZeRO checkpoint (all shards read on this one process)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    config = AutoConfig.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_config(config)
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or [name for name in missing if not name.endswith("position_ids")]:
        raise UserError(f"{checkpoint}: the ZeRO shards do not match the model config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def main(argv: list[str]) -> int:
    parser = ArgParser(prog="trainer_pkg.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("output_dir")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    checkpoint, output_dir = Path(args.checkpoint), Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise UserError(f"{output_dir} exists and is not empty; choose a new output directory")
    if is_deepspeed_checkpoint(checkpoint):
        model, tokenizer = consolidate(checkpoint), load_tokenizer(str(checkpoint))
    else:
        model, tokenizer = load_classifier(args.checkpoint)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    for name in (CONFIG_FILE, STATE_FILE):
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, output_dir / (EXPORT_CONFIG_FILE if name == CONFIG_FILE else name))
    apply_umask(output_dir)
    print(f"exported {checkpoint} -> {output_dir}")
    return 0


def cli_main() -> None:
    cli(main)


if __name__ == "__main__":
    cli_main()

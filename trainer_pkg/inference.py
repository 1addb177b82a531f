"""Run a model over a dataloader on every rank and gather the results exactly once."""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator

from trainer_pkg.console import RunConsole
from trainer_pkg.metrics import classification_metrics
from trainer_pkg.model import accepts_prepared_mask, model_inputs

# Rows per evaluation forward pass when none is given. On the CPU small batches are the fastest (a
# large one's attention scores and activations no longer fit in cache; benchmarks/eval_batch.py,
# docs/performance.md); a GPU needs large ones to be kept busy.
DEFAULT_EVAL_BATCH_SIZE = {"cpu": 32, "gpu": 256}


def eval_batch_size(given: int | None, device: str) -> int:
    """The evaluation batch per process: the one given, else the default for `device`."""
    if given is not None:
        return given
    return DEFAULT_EVAL_BATCH_SIZE["cpu" if device == "cpu" else "gpu"]


@torch.no_grad()
def predict_logits(accelerator: Accelerator, model, dataloader, console: RunConsole | None = None,
                   description: str = "eval") -> dict[str, np.ndarray]:
    """Logits (and labels, if present) for every row, in the dataset's row order, on every rank.

    Each rank runs its shard; gather_for_metrics drops the samples that even batches repeated,
    so every row is counted exactly once. The model's mode is as it was before.
    """
    was_training = model.training
    model.eval()
    prepared_mask = accepts_prepared_mask(accelerator.unwrap_model(model))
    if console is not None:
        console.start_progress(description, total=len(dataloader))
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "row": [], "labels": []}
    for batch in dataloader:
        rows = batch.pop("row")
        labels = batch.pop("labels", None)
        logits = model(**model_inputs(batch, prepared_mask)).logits.float()
        gathered = accelerator.gather_for_metrics((logits, rows) if labels is None else (logits, rows, labels))
        # Kept on the device until the end: a copy to the host per batch would sync every batch.
        parts["logits"].append(gathered[0])
        parts["row"].append(gathered[1])
        if labels is not None:
            parts["labels"].append(gathered[2])
        if console is not None:
            console.advance()
    if console is not None:
        console.stop_progress()
    model.train(was_training)
    rows = torch.cat(parts["row"]).cpu().numpy()
    order = np.argsort(rows, kind="stable")
    expected = len(dataloader.dataset)
    if len(rows) != expected or not np.array_equal(rows[order], np.arange(expected)):
        # Never report metrics over the wrong rows: this would mean a sharding bug.
        raise RuntimeError(f"gathered {len(rows)} predictions for {expected} rows (duplicates or gaps)")
    result = {"logits": torch.cat(parts["logits"]).cpu().numpy()[order], "row": rows[order]}
    if parts["labels"]:
        result["labels"] = torch.cat(parts["labels"]).cpu().numpy()[order]
    return result


def evaluate_dataloader(accelerator: Accelerator, model, dataloader, num_labels: int,
                        console: RunConsole | None = None, description: str = "eval") -> dict:
    """Metrics over the whole split, identical on every rank and to a single-process run."""
    return metrics_from_outputs(predict_logits(accelerator, model, dataloader, console, description), num_labels)


def metrics_from_outputs(outputs: dict[str, np.ndarray], num_labels: int) -> dict:
    """Metrics of gathered predictions (predict_logits' result, with labels)."""
    logits = torch.from_numpy(outputs["logits"])
    labels = torch.from_numpy(outputs["labels"]).long()
    metrics = classification_metrics(logits.argmax(-1).numpy(), labels.numpy(), num_labels)
    metrics["loss"] = float(torch.nn.functional.cross_entropy(logits, labels))
    return metrics

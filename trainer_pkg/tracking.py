"""Experiment tracking through Accelerate's trackers: TensorBoard, Weights & Biases, MLflow.

`--report_to auto` (the default) logs to TensorBoard when it is installed and to nothing
otherwise; naming a tracker that is not installed stops the run before any work is done. The
run's resolved configuration is stored once, then every record of log.jsonl that holds numbers
(training loss and speed, validation metrics, the final test metrics) becomes scalars
`<kind>/<name>` at its optimizer step.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from accelerate import Accelerator

from trainer_pkg.config import TrainConfig
from trainer_pkg.errors import UserError
from trainer_pkg.run_dir import LOG_FILE

PROJECT = "trainer_pkg"
# Accelerate's TensorBoard tracker writes through torch.utils.tensorboard, which needs this package.
REQUIRED_MODULE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# Fields of a log record that say where it is, not what was measured.
POSITION_FIELDS = ("step", "epoch", "time", "best")


def installed(tracker: str) -> bool:
    return importlib.util.find_spec(REQUIRED_MODULE[tracker]) is not None


def resolve_trackers(report_to: list[str]) -> list[str]:
    """The trackers to start, from a validated --report_to; a requested one that is missing is a UserError."""
    if "none" in report_to:
        return []
    trackers = []
    for name in report_to:
        if name == "auto":
            if installed("tensorboard") and "tensorboard" not in trackers:
                trackers.append("tensorboard")
            continue
        if not installed(name):
            raise UserError(f"--report_to {name}: the {name} package is not installed; "
                            f"pip install {REQUIRED_MODULE[name]}, or pass --report_to none")
        if name not in trackers:
            trackers.append(name)
    return trackers


def tracker_config(config: TrainConfig) -> dict[str, str | int | float | bool]:
    """The resolved config as flat scalars (TensorBoard's hparams take no lists, dicts or None)."""
    flat = {}
    for key, value in config.to_dict().items():
        if key == "lr":
            value = config.effective_lr
        if isinstance(value, list):
            value = ",".join(map(str, value))
        elif isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in value.items())
        elif value is None:
            value = ""
        flat[key] = value
    return flat


def tracking_line(trackers: list[str], config: TrainConfig, tensorboard_dir: Path) -> str:
    """Where the run's numbers go, in one line: every record is in log.jsonl whatever the trackers."""
    log = Path(config.output_dir) / LOG_FILE
    if not trackers:
        why = ("--report_to none" if "none" in config.report_to else
               "--report_to auto found no TensorBoard (pip install tensorboard)")
        return f"tracking: {why}; the numbers are in {log}"
    where = {"tensorboard": f"TensorBoard in {tensorboard_dir} (tensorboard --logdir {tensorboard_dir})",
             "wandb": "Weights & Biases", "mlflow": "MLflow"}
    return f"tracking: {', '.join(where[name] for name in trackers)}; and {log}"


def start_tracking(accelerator: Accelerator, config: TrainConfig) -> None:
    """Open the run in every tracker the accelerator was made with (main process only, by Accelerate)."""
    if not accelerator.log_with:
        return
    run_name = Path(config.output_dir).resolve().name
    accelerator.init_trackers(PROJECT, config=tracker_config(config), init_kwargs={
        "wandb": {"name": run_name, "dir": config.output_dir},
        "mlflow": {"run_name": run_name},
    })


class TrackerLog:
    """Sends the numbers of each log.jsonl record to the trackers, as `<kind>/<name>` scalars."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    def __call__(self, kind: str, record: dict) -> None:
        if not self.accelerator.trackers or "step" not in record:
            return
        scalars = {f"{kind}/{name}": value for name, value in record.items()
                   if name not in POSITION_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if scalars:
            self.accelerator.log(scalars, step=record["step"])

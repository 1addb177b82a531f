"""The real job: fine-tuning pretrained weights (../shared/models/all-MiniLM-L6-v2 on SST-2 rows).

Proof that the weights are loaded and used: the same steps from a random initialisation of the
same architecture score far lower. The export loads in `transformers.pipeline` with predict's
labels, and `trainer_pkg.evaluate` agrees with the run. Skipped without ../shared.
"""

from __future__ import annotations

import json
import random

import pytest
from conftest import run_module

TRAIN_ROWS = 1500
PREDICT_TEXTS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés .",
                 "an utterly dull , lifeless mess ."]


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    from conftest import SHARED

    model, data = SHARED / "models" / "all-MiniLM-L6-v2", SHARED / "data" / "sst2"
    if not (model / "model.safetensors").is_file() or not (data / "train.tsv").is_file():
        pytest.skip(f"no pretrained MiniLM or SST-2 under {SHARED} (a fresh clone without ../shared)")
    lines = (data / "train.tsv").read_text(encoding="utf-8").splitlines()
    rows = lines[1:]
    random.Random(0).shuffle(rows)
    subset = tmp_path_factory.mktemp("sst2") / "train.tsv"
    subset.write_text("\n".join([lines[0], *rows[:TRAIN_ROWS]]) + "\n", encoding="utf-8")
    return model, subset, data / "dev.tsv"


def train(model, train_file, dev_file, output_dir, env, *extra):
    """trainer_pkg's defaults but one epoch at a global batch of 16: 94 steps, enough for the new
    head (47 steps scored 0.56 on dev), for half the rows of two epochs at the default 32 (a step's
    cost here is its rows). The default would take three epochs; tests/test_plan.py checks that rule."""
    return run_module("trainer_pkg.train", "--model", model, "--train_file", train_file, "--validation_file", dev_file,
                      "--output_dir", output_dir, "--report_to", "none", "--epochs", "1", "--global_batch_size", "16",
                      *extra, env=env)


@pytest.mark.slow
def test_fine_tuning_pretrained_weights_beats_the_same_steps_from_scratch(sst2, cache_env, tmp_path):
    model, train_file, dev_file = sst2
    fine_tuned = train(model, train_file, dev_file, tmp_path / "pretrained", cache_env)
    # One line says which weights are new (the head) instead of transformers' table and warnings.
    assert "newly initialised: classifier.bias, classifier.weight" in fine_tuned.stderr
    assert "LOAD REPORT" not in fine_tuned.stderr + fine_tuned.stdout
    pretrained = json.loads((tmp_path / "pretrained" / "metrics.json").read_text(encoding="utf-8"))
    train(model, train_file, dev_file, tmp_path / "scratch", cache_env, "--from_scratch")
    scratch = json.loads((tmp_path / "scratch" / "metrics.json").read_text(encoding="utf-8"))
    assert pretrained["optimizer_steps"] == scratch["optimizer_steps"] == -(-TRAIN_ROWS // 16)
    dev_pretrained, dev_scratch = pretrained["validation"]["accuracy"], scratch["validation"]["accuracy"]
    assert dev_pretrained > 0.72, dev_pretrained
    # The same steps from a random init of the same architecture stay near chance.
    assert dev_pretrained > dev_scratch + 0.15, (dev_pretrained, dev_scratch)

    export = tmp_path / "pretrained" / "model"
    exported = json.loads((export / "config.json").read_text(encoding="utf-8"))
    assert exported["id2label"] == {"0": "0", "1": "1"}  # SST-2's labels, read from the data

    # evaluate, on its own, agrees with the run's report on the dev file (counts exactly).
    run_module("trainer_pkg.evaluate", export, "--output", tmp_path / "eval.json", env=cache_env)
    evaluated = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    assert evaluated["num_samples"] == 872
    assert evaluated["confusion_matrix"] == pretrained["validation"]["confusion_matrix"]

    # The export is a plain transformers model: the pipeline says what predict says.
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(export), tokenizer=str(export), device="cpu")
    from_pipeline = classify(PREDICT_TEXTS)
    predicted = run_module("trainer_pkg.predict", export, *PREDICT_TEXTS, env=cache_env)
    from_predict = [json.loads(line) for line in predicted.stdout.splitlines() if line.strip()]
    assert [row["label"] for row in from_predict] == [row["label"] for row in from_pipeline]
    for ours, theirs in zip(from_predict, from_pipeline):
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-5)
    assert [row["label"] for row in from_predict][:1] == ["1"] and from_predict[2]["label"] == "0"

"""Prediction at scale: a file sharded over processes gives one process's predictions (labels
exactly, probabilities to rounding: tests/same_results.py), stdin is answered chunk by chunk while
the producer is still writing, and transformers.pipeline on the export agrees with predict."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading

import pytest
from conftest import REPO, run_module
from same_results import assert_same_results
from test_distributed import launch, torchrun
from test_end_to_end import read_labels


@pytest.fixture(scope="module")
def one_process(tiny_run, tiny_nsmc, cache_env, tmp_path_factory) -> str:
    output = tmp_path_factory.mktemp("predict1") / "predictions.jsonl"
    run_module("trainer_pkg.predict", tiny_run / "model", "--input", tiny_nsmc / "ratings_test.txt",
               "--batch_size", "16", "--output", output, env=cache_env)
    return output.read_text(encoding="utf-8")


def test_predictions_carry_id_label_and_probability_in_input_order(one_process, tiny_nsmc):
    predictions = [json.loads(line) for line in one_process.splitlines()]
    rows = read_labels(tiny_nsmc / "ratings_test.txt")
    assert [p["id"] for p in predictions] == [row[0] for row in rows]
    for p in predictions:
        assert set(p) == {"id", "label", "label_id", "score", "probabilities"}
        assert p["score"] == max(p["probabilities"].values()) == p["probabilities"][p["label"]]


@pytest.mark.slow
def test_two_processes_write_the_one_process_predictions(tiny_run, tiny_nsmc, one_process, cache_env, tmp_path):
    output = tmp_path / "predictions.jsonl"
    # 301 rows in batches of 16 over 2 ranks: 19 batches, so the last round is padded by the sampler.
    launch(torchrun(2), "trainer_pkg.predict", tiny_run / "model", "--input", tiny_nsmc / "ratings_test.txt",
           "--batch_size", "16", "--output", output, env=cache_env)
    sharded = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert_same_results(sharded, [json.loads(line) for line in one_process.splitlines()])


def test_pipeline_reproduces_predict(tiny_run, tiny_nsmc, one_process):
    from transformers import pipeline

    texts = [row[1] for row in read_labels(tiny_nsmc / "ratings_test.txt")]
    predictions = [json.loads(line) for line in one_process.splitlines()]
    classifier = pipeline("text-classification", model=str(tiny_run / "model"), device="cpu")
    piped = classifier(texts, batch_size=32, truncation=True)
    assert [p["label"] for p in piped] == [p["label"] for p in predictions]
    assert [p["score"] for p in piped] == pytest.approx([p["score"] for p in predictions], abs=1e-5)


def test_stdin_is_answered_chunk_by_chunk(tiny_run, tiny_nsmc, one_process, cache_env):
    texts = [row[1] for row in read_labels(tiny_nsmc / "ratings_test.txt")[:4]]
    expected = [json.loads(line) for line in one_process.splitlines()[:4]]
    process = subprocess.Popen([sys.executable, "-m", "trainer_pkg.predict", str(tiny_run / "model"), "--input", "-",
                                "--chunk_size", "2"], cwd=REPO, env=cache_env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        process.stdin.write(f"{texts[0]}\n{texts[1]}\n")
        process.stdin.flush()
        # The first chunk is answered while stdin is still open: the stream is not read to the end first.
        first = [json.loads(lines.get(timeout=120)) for _ in range(2)]
        assert process.poll() is None
        process.stdin.write(f"{texts[2]}\n{texts[3]}\n")
        process.stdin.close()
        rest = [json.loads(lines.get(timeout=120)) for _ in range(2)]
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        process.kill()
    streamed = first + rest
    assert [p["line"] for p in streamed] == [1, 2, 3, 4]
    assert [p["label"] for p in streamed] == [p["label"] for p in expected]
    assert [p["score"] for p in streamed] == pytest.approx([p["score"] for p in expected], abs=1e-5)


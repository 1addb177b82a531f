"""The HTTP endpoint as a real server process: predictions equal predict's, concurrent requests,
one-line errors for bad requests, a clean stop on SIGTERM."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO, run_module

TEXTS = ["최고 명작 great", "최악 boring 별로", "", "영화 감독 wonderful 그냥", "it's \"dull\" 노잼"]


@pytest.fixture(scope="module")
def server(tiny_run, cache_env):
    process = subprocess.Popen([sys.executable, "-m", "trainer_pkg.serve", str(tiny_run / "model"), "--port", "0",
                                "--batch_size", "2", "--max_texts", "50"], cwd=REPO, env=cache_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        while True:
            line = lines.get(timeout=120)
            if line.startswith("serving"):
                break
        url = line.split(" on ", 1)[1].split()[0]
        yield url, process, lines
    finally:
        process.kill()
        process.wait()


def call(url: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_predictions_equal_predicts(server, tiny_run, cache_env):
    url, _, _ = server
    status, health = call(url, "/health")
    assert status == 200 and health["status"] == "ok" and health["labels"] == ["negative", "positive"]
    expected = [json.loads(line) for line in
                run_module("trainer_pkg.predict", tiny_run / "model", *TEXTS, env=cache_env).stdout.splitlines()]
    # Five texts with --batch_size 2: three forward passes, answers in request order.
    status, answer = call(url, "/predict", json.dumps({"texts": TEXTS}).encode())
    assert status == 200
    served = answer["predictions"]
    assert [p["label"] for p in served] == [p["label"] for p in expected]
    assert [p["label_id"] for p in served] == [p["label_id"] for p in expected]
    assert [p["score"] for p in served] == pytest.approx([p["score"] for p in expected], abs=1e-5)
    assert set(served[0]) == {"label", "label_id", "score", "probabilities"}


def test_concurrent_requests_get_their_own_answers(server):
    url, _, _ = server
    requests = [TEXTS[i:] + TEXTS[:i] for i in range(len(TEXTS))] * 2
    alone = [call(url, "/predict", json.dumps({"texts": texts}).encode())[1] for texts in requests[:len(TEXTS)]] * 2
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        together = list(pool.map(lambda texts: call(url, "/predict", json.dumps({"texts": texts}).encode())[1],
                                 requests))
    for mine, reference in zip(together, alone):
        assert [p["label"] for p in mine["predictions"]] == [p["label"] for p in reference["predictions"]]
        assert [p["score"] for p in mine["predictions"]] == pytest.approx(
            [p["score"] for p in reference["predictions"]], abs=1e-5)


@pytest.mark.parametrize("body, status, fragment", [
    (b'{"texts": ["unterminated', 400, "body is not valid JSON"),
    (b'["a list"]', 400, 'expected a JSON object {"texts": ["...", ...]}'),
    (b'{"texts": ["ok", 3]}', 400, "texts[1] is int, expected a string"),
    (json.dumps({"texts": ["x"] * 51}).encode(), 400, "51 texts in one request; send at most 50"),
])
def test_bad_requests_get_400_and_one_line(server, body, status, fragment):
    url, _, _ = server
    code, answer = call(url, "/predict", body)
    assert code == status
    assert fragment in answer["error"] and "\n" not in answer["error"]
    assert call(url, "/nowhere")[0] == 404
    assert call(url, "/predict", json.dumps({"texts": []}).encode()) == (200, {"predictions": []})


def test_sigterm_stops_the_server_cleanly(server):
    url, process, lines = server
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    remaining = []
    while not lines.empty():
        remaining.append(lines.get())
    assert "server stopped\n" in remaining
    assert not any("Traceback" in line for line in remaining)

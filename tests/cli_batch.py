"""Run many trainer_pkg command lines as separate processes while paying for the imports once.

    python tests/cli_batch.py JOBS.json RESULTS.json
    python tests/cli_batch.py --serve      (one JSON job a line on stdin, one result a line back)

JOBS.json is a list of {"name", "module", "args", "cwd"}. This process imports torch,
transformers, datasets and trainer_pkg once (about 5 s), then forks one child per job. The child
is the command `python -m MODULE ARGS...` from the import on: it runs the module as __main__ with
its own sys.argv, stdout and stderr go to files, and its exit status is the command's (an
uncaught exception prints its traceback and exits 1, as the interpreter would). Forty cold starts
would cost minutes of the suite's time; forty forks cost seconds.

RESULTS.json maps each name to {"returncode", "stdout", "stderr", "seconds", "timed_out"}; a job
may carry its own "timeout" (seconds, default 120).
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import time
import traceback
from pathlib import Path

TIMEOUT_S = 120


def run_child(job: dict, stdout_path: Path, stderr_path: Path) -> None:
    """In the forked child: become the command, then exit with its status (never return)."""
    code = 1
    try:
        os.chdir(job.get("cwd") or os.getcwd())
        # Never the server's stdin: that is where its jobs come from.
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        for fd, path in ((1, stdout_path), (2, stderr_path)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.argv = [job["module"], *job["args"]]
        # `python -m` runs a module that nothing has imported yet; the preload did import it.
        sys.modules.pop(job["module"], None)
        try:
            runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_job(job: dict, scratch: Path, timeout: float = TIMEOUT_S) -> dict:
    stdout_path, stderr_path = scratch / f"{job['name']}.out", scratch / f"{job['name']}.err"
    sys.stdout.flush()
    sys.stderr.flush()
    start = time.time()
    pid = os.fork()
    if pid == 0:
        run_child(job, stdout_path, stderr_path)
    deadline = start + job.get("timeout", timeout)
    timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            timed_out = True
            break
        time.sleep(0.01)
    return {
        "timed_out": timed_out,
        "returncode": os.waitstatus_to_exitcode(status),
        "stdout": stdout_path.read_text(encoding="utf-8", errors="replace"),
        "stderr": stderr_path.read_text(encoding="utf-8", errors="replace"),
        "seconds": round(time.time() - start, 2),
    }


def preload() -> None:
    """Everything the commands import, imported before the first fork. As under `python -m`, the
    working directory (the checkout under test) comes first on the path, not this script's folder."""
    sys.path[0] = os.getcwd()
    import importlib.util

    # Beyond the commands' modules, what a run imports only when it gets there (~2 s a run): the
    # BERT classes (transformers imports a model's module when the model is built), TensorBoard's
    # writer, the figures' pyplot, and DeepSpeed, which accelerate imports to unwrap a model.
    import torch.utils.tensorboard  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401

    import trainer_pkg.evaluate  # noqa: F401
    import trainer_pkg.predict  # noqa: F401
    import trainer_pkg.train  # noqa: F401
    from trainer_pkg.report import _pyplot

    _pyplot()

    if importlib.util.find_spec("deepspeed") is not None:
        import deepspeed  # noqa: F401


def serve(scratch: Path) -> None:
    """Jobs from stdin, one JSON object a line; each result back as one line on the stdout we were
    given (the preload's own output goes to stderr, so nothing else reaches that pipe)."""
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    preload()
    replies.write("ready\n")
    replies.flush()
    for number, line in enumerate(sys.stdin):
        job = json.loads(line)
        result = run_job({**job, "name": f"job{number}"}, scratch)
        replies.write(json.dumps(result, ensure_ascii=False) + "\n")
        replies.flush()


def main() -> None:
    if sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]))
        return
    jobs_path, results_path = Path(sys.argv[1]), Path(sys.argv[2])
    jobs = json.loads(jobs_path.read_text(encoding="utf-8"))
    preload()
    scratch = results_path.parent / f"{results_path.stem}_output"
    scratch.mkdir(parents=True, exist_ok=True)
    results = {job["name"]: run_job(job, scratch) for job in jobs}
    results_path.write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()

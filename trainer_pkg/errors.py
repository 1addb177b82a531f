"""One-line errors for the user, instead of tracebacks.

A `UserError` is a problem the user can fix (a path, a flag, a row in a file): its message names
the file/line/key and what to do. Command-line entry points run through `cli`, which prints it
on one line and exits non-zero; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable

STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


class UserError(Exception):
    """A problem in the user's input or environment, reported in one line."""


def quiet_libraries() -> None:
    """Library progress bars and info logs would bury our own progress and tables."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import torch
    import transformers

    if not torch.cuda.is_available():
        # DeepSpeed (imported by accelerate when installed) warns when it has to guess.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    quiet_libraries()
    debug = "--debug" in argv or os.environ.get("TRAINER_PKG_DEBUG") == "1"
    try:
        code = main(argv)
    except UserError as error:
        if debug:
            raise
        _exit_with(f"error: {error}")
    except OSError as error:
        # A full disk or a read-only directory anywhere (a log line, a metrics file): the
        # filesystem's own words and the file, not a traceback. Other OS errors are bugs.
        if debug or error.errno not in STORAGE_ERRNOS:
            raise
        where = f"{error.filename}: " if error.filename else ""
        _exit_with(f"error: {where}{error.strerror} (disk full or no permission?); free space or fix the permissions "
                   "(--debug shows where it happened)")
    except RuntimeError as error:
        if debug or not lost_a_peer(error):
            raise
        reason = re.sub(r"\[[^\]]*\.(cc|cpp):\d+\] ", "", " ".join(str(error).split())).split(". ")[0]
        _exit_with(f"error: lost contact with another process of this {os.environ.get('WORLD_SIZE')}-process job "
                   f"({reason[:160]}); it died or hung (--dist_timeout bounds the wait): see its output, fix the cause "
                   "and --resume from the last checkpoint")
    except KeyboardInterrupt:
        # On a line of its own: the interrupt may have cut a progress line short.
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


# What gloo and NCCL say when a peer process died (reset, closed) or hung (timed out).
PEER_FAILURE_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Timed out", "timed out", "Broken pipe",
                        "NCCL communicator was aborted", "Socket Timeout")


def lost_a_peer(error: RuntimeError) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or any(marker in str(error) for marker in PEER_FAILURE_MARKERS)


def _exit_with(message: str) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    print(f"{prefix}{message}", file=sys.stderr, flush=True)
    # os._exit: a rank must not wait in collective teardown for peers that will never come.
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(2)

"""What a person sees while the demo or the benchmark runs: phases with progress bars, the
results, and vLLM's own logs kept in a file.

vLLM, torch and the engine processes write to the process's stdout and stderr (file
descriptors 1 and 2, which the engine processes inherit when they start). `logs_to_file`
points both descriptors at a log file for the duration and hands back a stream to the
terminal, so only the tool's own lines and bars reach the screen.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from pathlib import Path
from typing import IO, Iterator

LOG_DIR_ENV = "VLLM_CLASP_LOG_DIR"


def default_log_path(tool: str) -> Path:
    """A new log file's path: $VLLM_CLASP_LOG_DIR, else ~/.cache/vllm-clasp/logs."""
    root = Path(os.environ.get(LOG_DIR_ENV) or Path.home() / ".cache" / "vllm-clasp" / "logs")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{tool}-{stamp}-{os.getpid()}.log"


@contextlib.contextmanager
def logs_to_file(path: Path) -> Iterator[IO[str]]:
    """Send fd 1 and 2 (this process and the processes it starts) to `path`; yield a
    line-buffered stream to the original stdout. Restored on exit, also on errors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(1), "w", buffering=1)
    with open(path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield console
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            console.flush()
            console.close()


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file ('' if it is missing)."""
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


class QuietFailure(Exception):
    """Raised inside `quiet` by a tool whose run ended with errors it caught itself (an
    engine that failed to start or to generate): `quiet` shows the log's tail, then re-raises."""


@contextlib.contextmanager
def quiet(tool: str, verbose: bool) -> Iterator[IO[str] | None]:
    """Run a tool's engine work with vLLM's output in a log file (its path printed first,
    its last lines printed on failure: an exception, `QuietFailure` included); yields the
    terminal stream, or None when `verbose` (everything stays on the terminal)."""
    if verbose:
        yield None
        return
    log = default_log_path(tool)
    print(f"vllm-clasp {tool}: vLLM's own logs go to {log}", file=sys.stderr, flush=True)
    try:
        with logs_to_file(log) as console:
            yield console
    except BaseException:
        print(f"vllm-clasp {tool}: failed; the last lines of {log}:\n{tail(log)}",
              file=sys.stderr, flush=True)
        raise

"""How a rank started by `bigbatch launch` reports a crash: one line, and the traceback in a file.

torchrun gives every worker TORCHELASTIC_ERROR_FILE; a rank that fails writes its error there in
torch's format (so torchrun's ChildFailedError carries the message and time) and its traceback as
text next to it, and prints nothing. The launcher then prints one line for the first failing rank
instead of every rank's traceback (the others mostly fail because that rank's connection closed).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from bigbatch.exit_codes import FAILED, INTERRUPTED

LAUNCHED = "BIGBATCH_LAUNCHED"  # set by `bigbatch launch` for its ranks


def launched_rank() -> bool:
    return os.environ.get(LAUNCHED) == "1" and bool(os.environ.get("TORCHELASTIC_ERROR_FILE"))


def error_line(err: BaseException) -> str:
    """The last line of the exception's traceback ('RuntimeError: boom'), shortened."""
    lines = [line.strip() for line in traceback.format_exception_only(type(err), err) if line.strip()]
    text = lines[-1] if lines else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def traceback_path(error_file: str | Path) -> Path:
    return Path(error_file).with_name("traceback.txt")


def record_rank_failure(err: BaseException) -> int:
    """Write the error file and the traceback for the launcher to report; the rank's exit code."""
    error_file = os.environ["TORCHELASTIC_ERROR_FILE"]
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    info = {"py_callstack": text, "timestamp": str(int(time.time())), "timestamp_ns": time.time_ns()}
    try:
        Path(error_file).parent.mkdir(parents=True, exist_ok=True)
        traceback_path(error_file).write_text(text)
        Path(error_file).write_text(json.dumps({"message": {"message": error_line(err), "extraInfo": info}}))
    except OSError:  # nowhere to write: the traceback goes to stderr after all
        sys.stderr.write(text)
    return FAILED


def interrupted() -> int:
    """Ctrl-C before the training loop could note it (while starting up): one line, exit 130."""
    if os.environ.get("RANK", "0") == "0":
        print("bigbatch: interrupted (Ctrl-C) before training started; nothing to save", file=sys.stderr,
              flush=True)
    return INTERRUPTED

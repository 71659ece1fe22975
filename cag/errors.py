"""How a failure reaches the user: one line for their mistakes, a traceback for our bugs.

Every error that a user's input can cause (a configuration key, a dataset file, a checkpoint,
an anchors file, the output location) is a :class:`UserInputError`; the package's own kinds
derive from it (``ConfigError``, ``DataError``, ``CheckpointError``, ``AnchorsError``,
``OutputError``). The command-line entry points run under :func:`cli_main`, which turns them
into a short message on stderr and a documented exit status:

====  ==================================================================================
0     success
1     a genuine bug (any other exception): Python prints its traceback; please report it
2     bad input: configuration, data, checkpoint, anchors file or output location
3     training stopped on a non-finite loss or gradient (the last good checkpoint is kept)
130   interrupted (Ctrl-C or SIGTERM); running the same command again resumes
====  ==================================================================================

``--debug`` on any command, or ``CAG_DEBUG=1`` in the environment, prints the traceback of a
user error as well. In a notebook the same line replaces the kernel's traceback
(``UserInputError._render_traceback_``); the cell still fails, so papermill stops there.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable

#: Exit statuses of every command (module docstring).
EXIT_OK, EXIT_BUG, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEBUG_ENV = "CAG_DEBUG"


class UserInputError(Exception):
    """A problem with something the user gave us; the message names the file or key."""

    #: The word the command line prints before the message.
    kind = "error"
    #: Under torchrun, True when every rank meets this error the same way (rank 0 alone reports
    #: it); False for one rank's own fault, such as a corrupt frame in its share of a batch.
    same_on_every_rank = False

    def _render_traceback_(self) -> list[str]:
        """What IPython/Jupyter shows for this error: its one line, not a traceback (the cell
        still fails, so papermill stops there); with ``CAG_DEBUG=1``, the whole traceback."""
        if debug_requested([]):
            import traceback

            return traceback.format_exception(self)
        return [f"{self.kind}: {user_message(self)}"]


class OutputError(UserInputError, OSError):
    """An output file or folder cannot be written (full disk, no permission, a file in the way)."""

    kind = "output error"


def writable_folder(path, what: str) -> None:
    """Create ``path`` if needed and prove a file can be written in it, before any work.

    Raises :class:`OutputError` starting with ``what`` (a key such as ``out_dir``, or a
    description) when a file stands in the way, permission is missing or the disk is full.
    """
    from pathlib import Path

    path = Path(path)
    probe = path / f".write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker is not None else (err.strerror or str(err))
        raise OutputError(f"{what}: cannot write {path} ({reason})") from None


class TrainingStopped(Exception):
    """Training cannot continue (a non-finite loss); the last good checkpoint is kept."""


def user_message(err: BaseException) -> str:
    """The message of ``err`` without the traceback a DataLoader worker embeds in it.

    An exception raised in a DataLoader worker is raised again in the main process with the
    worker's traceback inside its message ("Caught DataError in DataLoader worker process 0.
    Original Traceback ..."); the last line of that traceback is the original message.
    """
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name = type(err).__name__
        text = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return text.strip()


def debug_requested(argv=None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _rank_prefix() -> str:
    rank, world = os.environ.get("RANK"), int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"[rank {rank}] " if world > 1 and rank not in (None, "") else ""


def _quiet_rank() -> bool:
    """Under torchrun, rank 0 alone reports errors that every rank meets the same way."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and os.environ.get("RANK", "0") != "0"


def report(err: BaseException, debug: bool = False, file=None) -> int:
    """Print ``err`` for a user and return the exit status it calls for (module docstring)."""
    import traceback

    file = file or sys.stderr
    if isinstance(err, KeyboardInterrupt):
        print("\ninterrupted: finished stages and the last checkpoint are kept; run the same command "
              "again to resume", file=file)
        return EXIT_INTERRUPTED
    if isinstance(err, UserInputError):
        status, line = EXIT_BAD_INPUT, f"{err.kind}: {user_message(err)}"
    elif isinstance(err, TrainingStopped):
        status, line = EXIT_DIVERGED, f"training stopped: {user_message(err)}"
    else:  # anything else is a bug: the whole traceback
        traceback.print_exception(err, file=file)
        return EXIT_BUG
    if debug:
        traceback.print_exception(err, file=file)
    shared = getattr(err, "same_on_every_rank", False)
    if not (shared and _quiet_rank()):
        print(("" if shared else _rank_prefix()) + line, file=file)
    return status


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def cli_main(main: Callable[[list[str]], int], argv=None) -> int:
    """Run a command's ``main(argv)`` and turn its failures into a message and a status.

    ``--debug`` is taken out of ``argv`` before ``main`` sees it. SIGTERM is treated like
    Ctrl-C (status 130), so a scheduler's stop leaves the same state as an interrupt.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        previous = signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # not the main thread
        previous = None
    try:
        return main(argv)
    except (UserInputError, TrainingStopped, KeyboardInterrupt) as err:
        return report(err, debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

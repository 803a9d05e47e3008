"""How every entry point ends, in one line (inventory: docs/errors.md).

- A refused request (:class:`RequestError`, any ``ValueError`` or a missing file) exits 2 with one
  line naming the key (or file and key) at fault and the accepted range; entry points check the
  whole request before they start Ray, open an MLflow run or write their outputs.
- A failure after the start exits 1 with one line (``TSMD_TRACEBACK=1`` adds the traceback).
- ``Ctrl+C`` exits 130 and ``SIGTERM`` (``kill``) exits 143: both are raised in the main thread
  (:class:`Terminated` is a ``KeyboardInterrupt``), so ``finally`` blocks and the MLflow trackers'
  context managers end their runs as ``KILLED`` (failures: ``FAILED``, the error as a tag).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
REFUSED = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
RESUME_HINT = "continue it with the same command and --resume"
INTERRUPTED = "interrupted (Ctrl+C)"
TERMINATED = "terminated (SIGTERM)"


class RequestError(ValueError):
    """A request refused before anything starts; ``rule`` names its class in docs/errors.md."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


class Terminated(KeyboardInterrupt):
    """``SIGTERM``, raised in the main thread like ``Ctrl+C`` so that clean-up code runs."""


def one_line(exc: BaseException | str) -> str:
    """The message of ``exc`` on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def failure_message(exc: BaseException) -> str:
    """``Type: message`` on one line: what an MLflow run's error tag and the exit line say."""
    return one_line(f"{type(exc).__name__}: {exc}")


def is_sigterm(exc: BaseException) -> bool:
    """:class:`Terminated`, or the ``SystemExit(15)`` of the SIGTERM handler that ``ray.init`` installs."""
    return isinstance(exc, Terminated) or (isinstance(exc, SystemExit) and exc.code == signal.SIGTERM)


def ending(exc: BaseException | None) -> tuple[str, str | None]:
    """The MLflow status of a run that ``exc`` ended (``None``: it finished) and what its
    ``tsmd.error`` tag says: FAILED with ``Type: message``, or KILLED for Ctrl+C and SIGTERM."""
    if exc is None:
        return "FINISHED", None
    if is_sigterm(exc):
        return "KILLED", TERMINATED
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED", INTERRUPTED
    if isinstance(exc, SystemExit):
        return "KILLED", f"exited with status {exc.code}"
    return "FAILED", failure_message(exc)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(TERMINATED)


@contextlib.contextmanager
def on_sigterm(handler: Callable[[int, FrameType | None], Any] = _raise_terminated) -> Iterator[None]:
    """Within the block, ``SIGTERM`` calls ``handler`` (default: raise :class:`Terminated`) in the
    main thread; the previous handler is restored after it.

    ``ray.init`` replaces the handler by one that raises ``SystemExit(15)``, which
    :func:`entry_point` and :func:`ending` treat as SIGTERM too.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def entry_point(name: str, body: Callable[[], int | None], *, resumable: bool = False) -> int:
    """Run an entry point's ``body`` and turn how it ends into one log line and an exit status.

    ``resumable``: a failure or interruption tells the user that ``--resume`` continues the run.
    """
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    log = logging.getLogger(name)
    hint = f"; {RESUME_HINT}" if resumable else ""
    try:
        with on_sigterm():
            return int(body() or 0)
    except REFUSED as exc:
        log.error("%s", one_line(exc))
        return EXIT_REFUSED
    except (KeyboardInterrupt, SystemExit) as exc:
        if not (isinstance(exc, KeyboardInterrupt) or is_sigterm(exc)):
            raise  # argparse's usage errors (2), --help (0)
        log.error("%s%s", ending(exc)[1], hint)
        return EXIT_TERMINATED if is_sigterm(exc) else EXIT_INTERRUPTED
    except Exception as exc:
        log.error("failed: %s%s", failure_message(exc), hint, exc_info=bool(os.environ.get("TSMD_TRACEBACK")))
        return EXIT_FAILED

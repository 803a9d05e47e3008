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

EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
REFUSED = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
RESUME_HINT = "continue it with the same command and --resume"


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


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"terminated by signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, ``SIGTERM`` raises :class:`Terminated` in the main thread.

    ``ray.init`` replaces the handler by one that raises ``SystemExit(15)``: :func:`entry_point`
    treats that as ``SIGTERM`` too.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
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
        with sigterm_raises():
            return int(body() or 0)
    except REFUSED as exc:
        log.error("%s", one_line(exc))
        return EXIT_REFUSED
    except Terminated:
        log.error("terminated (SIGTERM)%s", hint)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        log.error("interrupted (Ctrl+C)%s", hint)
        return EXIT_INTERRUPTED
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:  # argparse's usage errors (2), --help (0)
            raise
        log.error("terminated (SIGTERM)%s", hint)
        return EXIT_TERMINATED
    except Exception as exc:
        log.error("failed: %s%s", failure_message(exc), hint, exc_info=bool(os.environ.get("TSMD_TRACEBACK")))
        return EXIT_FAILED

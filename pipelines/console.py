"""A console a person can read during a distributed run: one line per epoch, Ray's own chatter in the log files.

Without ``-v`` the driver starts Ray with ``log_to_driver=False``: what Ray processes print (Ray Train's result dicts,
Ray Data's execution plans, deprecation and PreemptionWatcher warnings) stays in the session's log files
(``/tmp/ray/session_latest/logs``).  The lines a user wants from the workers (the per-epoch progress line, warnings
about the run) travel through a small named actor instead (:class:`ConsoleRelay`): rank 0 puts them there
(:func:`say`) and a thread of the driver prints them as they arrive (:func:`relaying`).  Errors are not lost: a
failed worker's exception reaches the driver through ``TrainingFailedError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import ray

NAMESPACE = "rgnet"
log = logging.getLogger("rgnet.console")


@ray.remote(num_cpus=0)
class ConsoleRelay:
    """Lines for the driver's console, in the order they were put."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def put(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


def relay_name(run_key: str) -> str:
    """The relay's actor name for a run (its Ray run folder); several runs may share a cluster."""
    return "console-" + hashlib.sha1(run_key.encode()).hexdigest()[:16]


@contextlib.contextmanager
def relaying(run_key: str, period: float = 0.5) -> Iterator[None]:
    """Create the run's relay and print what arrives there until the block ends (then print the rest)."""
    relay = ConsoleRelay.options(name=relay_name(run_key), namespace=NAMESPACE).remote()  # type: ignore[attr-defined]
    stop = threading.Event()

    def pump() -> None:
        while True:
            done = stop.wait(period)
            try:
                for line in ray.get(relay.take.remote(), timeout=30):
                    print(line, flush=True)
            except Exception as e:  # the console must never end the run
                log.debug("console relay: %s", e)
            if done:
                return

    thread = threading.Thread(target=pump, name="rgnet-console", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=35)
        with contextlib.suppress(Exception):
            ray.kill(relay)


def say(run_key: str, line: str, fallback: Any = None) -> None:
    """Send ``line`` to the run's console relay; without one (e.g. a Tune trial) log it with ``fallback``."""
    try:
        relay = ray.get_actor(relay_name(run_key), namespace=NAMESPACE)
    except ValueError:
        (fallback or log).info(line)
        return
    relay.put.remote(line)

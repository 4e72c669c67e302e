"""The engine's output thread: what must follow the engine's order but need not hold up the engine thread.

Step events to Redis (one pipeline per iteration, previews PNG-encoded there), decoded pictures waited for,
checked, turned into PIL images, and results or errors handed to the callers: each is queued by the engine
thread and run here in the order queued, so a request's last step event is written before its result is
delivered (and before its task writes the job's terminal event), while the engine thread goes on to launch
the next backbone call. With `threaded=False` the work runs at once on the caller's thread (as before).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)
_STOP = object()


class OutputQueue:
    def __init__(self, name: str, threaded: bool = True):
        self.name = name
        self.threaded = threaded
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> OutputQueue:
        if self.threaded and self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        if self._thread is None:
            self._call(fn, args, kwargs)
        else:
            self._queue.put((fn, args, kwargs))

    def close(self, timeout: float | None = 30.0) -> None:
        """Run what is queued, then end the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            self._call(*item)

    @staticmethod
    def _call(fn: Callable, args, kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("engine output work failed")

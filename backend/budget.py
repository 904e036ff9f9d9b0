"""A per-process memory budget for decoded images in flight (IMAGE_MEMORY_MB).

Downloads and decodes run outside the inference lock, in every request thread at once; without a bound, 8
threads each decoding a chunk of 16 large images could hold gigabytes. A chunk reserves the decoded size of its
images (from their headers) before decoding any, all at once, so two chunks can never each hold half and wait
for each other; it waits while others hold the budget, and a chunk larger than the whole budget runs alone.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class ByteBudget:
    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.held = 0
        self._changed = threading.Condition()

    @contextmanager
    def reservation(self) -> Iterator[Callable[[int], None]]:
        """Yields ``reserve(n)``: call it once, before allocating; what it reserved is released on exit."""
        taken = 0

        def reserve(n: int) -> None:
            nonlocal taken
            n = min(max(n, 0), self.limit)
            with self._changed:
                self._changed.wait_for(lambda: self.held + n <= self.limit)
                self.held += n
            taken = n

        try:
            yield reserve
        finally:
            if taken:
                with self._changed:
                    self.held -= taken
                    self._changed.notify_all()

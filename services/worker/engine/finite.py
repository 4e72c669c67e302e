"""Non-finite latents, caught on the device and read on the host only every few iterations.

Reading a flag on the host (`.tolist()`, `bool(tensor)`) waits for every kernel queued before it: on a GPU that
is a stall per step, the engine thread idle while the GPU drains and the GPU idle while the thread then prepares
the next call. So each iteration only queues `~isfinite(x).all()` per row on the device; the flags are read in
one go every `every` iterations, and whenever a request finishes (its latents are decoded only after a check).
A request whose latents went non-finite fails naming the step where they did, a few steps late at most; its rows
meanwhile only poison themselves (the backbone and every update work per row). `every` = 1 reads each
iteration (the CPU, where reading costs nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class FiniteWatch:
    def __init__(self, every: int = 1):
        self.every = max(1, int(every))
        self._iterations = 0
        # per observed iteration: the members, their image counts, the step each made, per-row "non-finite"
        self._pending: list[tuple[Sequence[Any], list[int], list[int], torch.Tensor]] = []

    def observe(self, members: Sequence[Any], counts: list[int], steps: list[int], x: torch.Tensor) -> None:
        """x (N, ...): this iteration's new latents, members' rows in order (counts[k] rows for members[k],
        which just made step steps[k]). Queues a device op; reads nothing."""
        self._pending.append((members, counts, steps, ~torch.isfinite(x).flatten(1).all(1)))
        self._iterations += 1

    def due(self, force: bool = False) -> bool:
        return bool(self._pending) and (force or self._iterations % self.every == 0)

    def check(self) -> list[tuple[Any, int]]:
        """[(member, the first step at which its latents were non-finite)] over everything observed since the
        last check; one wait for the device."""
        if not self._pending:
            return []
        flags = torch.cat([bad for *_, bad in self._pending]).tolist()
        first: dict[int, tuple[Any, int]] = {}  # by id(member): requests are compared by identity
        row = 0
        for members, counts, steps, _ in self._pending:
            for member, count, step in zip(members, counts, steps):
                if id(member) not in first and any(flags[row : row + count]):
                    first[id(member)] = (member, step)
                row += count
        self._pending = []
        return list(first.values())

    def forget(self) -> None:
        self._pending = []

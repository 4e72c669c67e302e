"""Typed engine errors. The Celery task maps them to job failures at the edge."""

from __future__ import annotations

import torch


class EngineError(Exception):
    """Base of every error the engine raises from RequestHandle.result() or submit()."""


class RequestCancelled(EngineError):
    """The request was cancelled; it left the batch at the next step boundary."""


class NonFiniteOutputError(EngineError):
    """The request's latents or pixels became NaN or infinite; the other requests go on."""


class InvalidRequestError(EngineError, ValueError):
    """A field of the request is out of range; `field` names it (raised by Engine.submit)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class EngineStopped(EngineError):
    """The engine was stopped before the request finished."""


def device_lost(error: BaseException) -> bool:
    """An error that leaves the device unusable for everything after it (a sticky CUDA error: an illegal memory
    access, a device that fell off the bus): every later call would fail too, so the engine stops stepping rather
    than fail the queue one iteration at a time (Engine.broken)."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(error, accelerator_error) or (isinstance(error, RuntimeError) and "CUDA error" in str(error))


def out_of_memory(error: BaseException) -> bool:
    """A call that did not fit in memory: CUDA's OutOfMemoryError, or the CPU allocator's refusal (the engine then
    runs it again in smaller calls: engine.RowCap)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )

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


# The CUDA errors after which the context is unusable (CUDA's "sticky" errors: every later call fails the same way),
# as torch words them. Other CUDA errors (a cuBLAS status, an invalid launch configuration, out of memory) fail only
# the iteration they happen in.
STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "illegal address",
    "misaligned address",
    "device-side assert",
    "unspecified launch failure",
    "uncorrectable ECC error",
    "an illegal instruction",
    "device not ready",
    "busy or unavailable",
    "GPU has fallen off the bus",
)


def device_lost(error: BaseException) -> bool:
    """An error that leaves the device unusable for everything after it (a sticky CUDA error): every later call
    would fail too, so the engine stops stepping rather than fail the queue one iteration at a time
    (Engine.broken)."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    cuda = isinstance(error, accelerator_error) or (isinstance(error, RuntimeError) and "CUDA error" in str(error))
    return cuda and any(sticky in str(error) for sticky in STICKY_CUDA_ERRORS)


def out_of_memory(error: BaseException) -> bool:
    """A call that did not fit in memory: CUDA's OutOfMemoryError, or the CPU allocator's refusal (the engine then
    runs it again in smaller calls: engine.RowCap)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )

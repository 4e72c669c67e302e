"""Host -> device copies that do not wait for the GPU.

A copy from pageable host memory is synchronous: it waits for every kernel queued before it, leaving the GPU
idle while the host then prepares the next call. Small per-step or per-admission tensors built on the host
(row coefficients, token ids, SDXL's time ids) go through pinned memory instead, queued behind the GPU's work
(PyTorch's pinned allocator keeps the buffer until the copy has run).
"""

from __future__ import annotations

import torch


def to_device(values: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`values` (on the host) on `device`, in `dtype` if given, without waiting for queued GPU work."""
    device = torch.device(device)
    if dtype is not None and values.dtype != dtype:
        values = values.to(dtype)
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)

"""Shared dependencies as Annotated aliases: the application core and the caller's identity."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.core import Core


def get_core(request: Request) -> Core:
    return request.app.state.core


def get_owner(request: Request) -> str:
    """The caller's key hash (the owner of the jobs it makes); anonymous when no keys are configured."""
    return request.app.state.core.authenticate(request.headers.get("authorization"))


CoreDep = Annotated[Core, Depends(get_core)]
OwnerDep = Annotated[str, Depends(get_owner)]

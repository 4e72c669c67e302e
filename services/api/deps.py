"""Shared dependencies as Annotated aliases: settings, the job store, the Celery client, the caller's identity."""

from __future__ import annotations

import hmac
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from services.common.errors import Unauthorized
from services.common.jobstore import JobStore
from services.common.settings import Settings, hash_key

ANONYMOUS = "anonymous"


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


def get_owner(request: Request) -> str:
    """The caller's key hash (the owner of the jobs it makes); anonymous when no keys are configured."""
    hashes: set[str] = request.app.state.key_hashes
    if not hashes:
        return ANONYMOUS
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", None)
    digest = hash_key(token.strip())
    # compare against every stored hash, in constant time each
    matched = False
    for stored in hashes:
        matched |= hmac.compare_digest(digest, stored)
    if not matched:
        raise Unauthorized("invalid API key", None)
    return digest


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
OwnerDep = Annotated[str, Depends(get_owner)]

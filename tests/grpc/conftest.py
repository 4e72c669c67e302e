"""Fixtures: real Redis (its own database), the contract gateway, and the real gRPC server in-process."""

import grpc
import pytest
import redis

from services.api import grpc_server
from tests.grpc.contract_gateway import API_KEY, ContractGateway

REDIS_URL = "redis://127.0.0.1:6379/13"


@pytest.fixture
def gateway():
    redis.Redis.from_url(REDIS_URL).flushdb()
    gw = ContractGateway(REDIS_URL)
    yield gw
    gw.close()


@pytest.fixture
def grpc_target(gateway):
    server, port, watcher = grpc_server.build_server(gateway.url, port=0, health_interval_s=0.2)
    server.start()
    watcher.start()
    yield f"127.0.0.1:{port}"
    watcher.stopped.set()
    server.stop(grace=None)


@pytest.fixture
def channel(grpc_target):
    with grpc.insecure_channel(grpc_target) as ch:
        yield ch


AUTH = (("authorization", f"Bearer {API_KEY}"),)

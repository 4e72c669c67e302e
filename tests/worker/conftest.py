from __future__ import annotations

import pytest

from services.worker.engine.engine import Engine
from services.worker.loading import load_model
from tests.fixtures.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    return load_model(tiny_model_path)


@pytest.fixture
def make_engine(tiny_model):
    engines = []

    def make(model=None, **kwargs) -> Engine:
        engine = Engine(model or tiny_model, **kwargs).start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()

"""The Python client over REST and gRPC with one interface; resume after dropped connections."""

import asyncio

import pytest

from client.latentd_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    InvalidRequestError,
    JobFailedError,
    NotFoundError,
)
from tests.grpc.contract_gateway import API_KEY

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["rest", "grpc"])
def url(request, gateway, grpc_target):
    return gateway.url if request.param == "rest" else f"grpc://{grpc_target}"


def test_generate_wait_and_fetch(url):
    with Client(url, API_KEY) as client:
        job = client.generate("a red circle on a white background", num_inference_steps=4, seed=1)
        assert job.status == "queued" and job.seed == 1
        steps = [e.step for e in client.events(job.id) if e.type == "step"]
        assert steps == [1, 2, 3, 4]
        done = client.wait(job.id, timeout=30)
        assert done.status == "succeeded" and done.images
        assert client.image(job.id, 0).startswith(b"\x89PNG")
        assert [m.name for m in client.models()] == ["tiny"]


def test_typed_errors_carry_the_server_message(url):
    with Client(url, API_KEY) as client:
        with pytest.raises(InvalidRequestError) as err:
            client.generate("x", num_inference_steps=0)
        assert err.value.param == "num_inference_steps" and "between 1 and 1000, got 0" in err.value.message
        with pytest.raises(NotFoundError):
            client.get_job("missing")
    with Client(url, "bad-key") as client, pytest.raises(AuthenticationError):
        client.models()


def test_wait_raises_on_cancel(url):
    with Client(url, API_KEY) as client:
        job = client.generate("x", num_inference_steps=300)
        client.cancel(job.id)
        with pytest.raises(JobFailedError) as err:
            client.wait(job.id, timeout=30)
        assert err.value.job.status == "cancelled"


def test_resume_after_dropped_connection(gateway, url):
    """The gateway hangs up after every 2 events; the client resumes from Last-Event-ID each time
    and sees every event once, in order."""
    with Client(gateway.url, API_KEY) as reference:
        job = reference.generate("x", num_inference_steps=8)
        expected = [e.id for e in reference.events(job.id)]
    gateway.drop_after = 2
    with Client(url, API_KEY, reconnect_delay=0.01) as client:
        seen = list(client.events(job.id))
    assert [e.id for e in seen] == expected
    assert [e.step for e in seen if e.type == "step"] == list(range(1, 9))


def test_async_client(url):
    async def run():
        async with AsyncClient(url, API_KEY, reconnect_delay=0.01) as client:
            job = await client.generate("a blue square", num_inference_steps=3)
            types = [e.type async for e in client.events(job.id)]
            done = await client.wait(job.id, timeout=30)
            return types, done, await client.image(job.id, 0)

    types, done, png = asyncio.run(run())
    assert types[0] == "queued" and types[-1] == "succeeded" and types.count("step") == 3
    assert done.status == "succeeded" and png.startswith(b"\x89PNG")

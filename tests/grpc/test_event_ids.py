"""StreamJobEvents' after_event_id is checked by the one rule REST's Last-Event-ID follows (rules.check_event_id):
a malformed one is INVALID_ARGUMENT naming the field, never INTERNAL from deep in the event log."""

from __future__ import annotations

import grpc
import pytest

from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb
from services.common.grpc_gen.latentd.v1 import latentd_pb2_grpc as pb_grpc
from tests.grpc.conftest import DOOR_KEY, auth

pytestmark = pytest.mark.timeout(60)


def _queued_job(channel) -> str:
    params = pb.GenerationParams(prompt="x", num_inference_steps=2)
    request = pb.SubmitGenerationRequest(params=params)
    return pb_grpc.LatentdServiceStub(channel).SubmitGeneration(request, metadata=auth(DOOR_KEY)).job.id


def _stream(channel, job_id: str, after: str) -> list:
    request = pb.StreamJobEventsRequest(job_id=job_id, after_event_id=after)
    return list(pb_grpc.LatentdServiceStub(channel).StreamJobEvents(request, metadata=auth(DOOR_KEY), timeout=10))


@pytest.mark.parametrize(
    "after",
    ["garbage", "1-", "1-2-3", "17e3", "18446744073709551616-0", "9" * 30],
)
def test_a_malformed_after_event_id_is_invalid_argument_naming_the_field(door, after):
    with grpc.insecure_channel(door.target) as channel:
        job_id = _queued_job(channel)
        with pytest.raises(grpc.RpcError) as err:
            _stream(channel, job_id, after)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details() == f"after_event_id must be an event id like 1700000000000-0, got {after!r}"
    assert dict(err.value.trailing_metadata())["latentd-param"] == "after_event_id"


def test_a_well_formed_after_event_id_still_streams(door):
    """The job is queued (no worker): its one event so far is `queued`; after it, the stream waits, so each read
    here stops at its deadline once the events at hand are out."""
    with grpc.insecure_channel(door.target) as channel:
        job_id = _queued_job(channel)
        request = pb.StreamJobEventsRequest(job_id=job_id, after_event_id="0")
        call = pb_grpc.LatentdServiceStub(channel).StreamJobEvents(request, metadata=auth(DOOR_KEY), timeout=10)
        first = next(call)
        call.cancel()
    assert first.event.type == pb.EVENT_TYPE_QUEUED and first.event.id

"""ListJobs: the caller's jobs newest first, a page at a time, filtered by status, as GET /v1/jobs (one core
method behind both); a bad limit, status or starting_after is INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import grpc
import pytest

from services.common.grpc_gen.latentd.v1 import latentd_pb2 as pb
from services.common.grpc_gen.latentd.v1 import latentd_pb2_grpc as pb_grpc
from tests.grpc.conftest import DOOR_KEY, auth

pytestmark = pytest.mark.timeout(60)


def _submit(stub) -> str:
    request = pb.SubmitGenerationRequest(params=pb.GenerationParams(prompt="x", num_inference_steps=2))
    return stub.SubmitGeneration(request, metadata=auth(DOOR_KEY)).job.id


def _list(stub, **fields) -> pb.ListJobsResponse:
    return stub.ListJobs(pb.ListJobsRequest(**fields), metadata=auth(DOOR_KEY), timeout=10)


def test_jobs_are_listed_newest_first_in_pages_and_by_status(door):
    with grpc.insecure_channel(door.target) as channel:
        stub = pb_grpc.LatentdServiceStub(channel)
        first = _submit(stub)
        stub.CancelJob(pb.CancelJobRequest(job_id=first), metadata=auth(DOOR_KEY))  # frees its slot of two
        second, third = _submit(stub), _submit(stub)
        everything = _list(stub)
        page = _list(stub, limit=2)
        rest = _list(stub, limit=2, starting_after=page.next_starting_after)
        cancelled = _list(stub, status=[pb.JOB_STATUS_CANCELLED])
    assert [job.id for job in everything.jobs] == [third, second, first] and not everything.has_more
    assert everything.jobs[0].status == pb.JOB_STATUS_QUEUED and everything.jobs[0].generation.prompt == "x"
    assert [job.id for job in page.jobs] == [third, second] and page.has_more and page.next_starting_after == second
    assert [job.id for job in rest.jobs] == [first] and not rest.has_more and rest.next_starting_after == ""
    assert [job.id for job in cancelled.jobs] == [first]


@pytest.mark.parametrize(
    "fields, param, details",
    [
        ({"limit": 0}, "limit", "limit must be between 1 and 100, got 0"),
        ({"status": [pb.JOB_STATUS_UNSPECIFIED]}, "status", "status must be one of queued, running, succeeded, "
         "failed, cancelled, got 'JOB_STATUS_UNSPECIFIED'"),
        ({"starting_after": "nope"}, "starting_after", None),
    ],
)  # fmt: skip
def test_a_bad_page_request_is_invalid_argument_naming_the_field(door, fields, param, details):
    with grpc.insecure_channel(door.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            _list(pb_grpc.LatentdServiceStub(channel), **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert dict(err.value.trailing_metadata())["latentd-param"] == param
    assert details is None or err.value.details() == details

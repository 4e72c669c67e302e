"""GET /v1/jobs: the caller's jobs of the last result_ttl_s, newest first, in pages, filtered by status; another key's
jobs never show; a bad limit, status or starting_after is a 422 naming it."""

from __future__ import annotations

import pytest
import redis

from services.common import rules
from services.common.jobstore import job_key
from tests.fixtures.gateway import in_process_gateway
from tests.fixtures.tiny_model import published_info

REDIS_URL = "redis://127.0.0.1:6379/9"
KEY, OTHER = "list-key", "other-key"


@pytest.fixture
def client(model_path):
    info = published_info(tokenizer_path=str(model_path / "tokenizer"))
    with in_process_gateway(REDIS_URL, KEY, info, other_keys=(OTHER,), max_queue_per_model=100) as test_client:
        yield test_client


def submit(client, prompt: str, key: str = KEY) -> str:
    response = client.post("/v1/generations", json={"prompt": prompt}, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def ids(page: dict) -> list[str]:
    return [job["id"] for job in page["jobs"]]


def test_a_keys_jobs_are_listed_newest_first_in_pages(client):
    mine = [submit(client, f"a red circle {n}") for n in range(5)]
    theirs = submit(client, "a blue square", OTHER)
    everything = client.get("/v1/jobs").json()
    assert ids(everything) == mine[::-1] and everything["has_more"] is False
    assert everything["next_starting_after"] is None
    assert everything["jobs"][0] == client.get(f"/v1/jobs/{mine[-1]}").json()  # each as GET /v1/jobs/{id} shows it
    pages, after = [], ""
    while after is not None:
        page = client.get("/v1/jobs", params={"limit": 2, "starting_after": after}).json()
        pages.append(ids(page))
        after = page["next_starting_after"]
        assert page["has_more"] is (after is not None)
    assert pages == [mine[:2:-1], mine[2:0:-1], mine[:1]]
    other = client.get("/v1/jobs", headers={"Authorization": f"Bearer {OTHER}"}).json()
    assert ids(other) == [theirs]


def test_a_status_filter_reads_a_bounded_share_of_the_history_per_page(client, monkeypatch):
    jobs = [submit(client, f"a green triangle {n}") for n in range(4)]
    assert client.post(f"/v1/jobs/{jobs[0]}/cancel").status_code == 200
    assert ids(client.get("/v1/jobs?status=cancelled").json()) == [jobs[0]]
    both = ids(client.get("/v1/jobs?status=queued,cancelled").json())
    assert both == ids(client.get("/v1/jobs?status=queued&status=cancelled").json()) == jobs[::-1]
    assert ids(client.get("/v1/jobs?status=queued,%20cancelled").json()) == both  # a space after a comma
    pages, after = [], ""
    while after is not None:  # a filtered page reads the records of only as many jobs as it holds; none is skipped
        page = client.get("/v1/jobs", params={"status": "queued", "limit": 1, "starting_after": after}).json()
        pages.append(ids(page))
        after = page["next_starting_after"]
    assert pages == [[job] for job in jobs[:0:-1]] + [[]]  # the oldest is cancelled: the history went on past it
    monkeypatch.setattr(rules, "LIST_SCAN", 2)  # a page reads 2 entries: the oldest job is on the second page
    first = client.get("/v1/jobs?status=cancelled").json()
    assert first["jobs"] == [] and first["has_more"] is True and first["next_starting_after"] == jobs[2]
    second = client.get(f"/v1/jobs?status=cancelled&starting_after={jobs[2]}").json()
    assert ids(second) == [jobs[0]] and second["has_more"] is False


def test_a_job_whose_record_is_gone_is_left_out(client):
    jobs = [submit(client, f"a white circle {n}") for n in range(3)]
    redis.Redis.from_url(REDIS_URL).delete(job_key(jobs[1]))  # evicted before its time
    assert ids(client.get("/v1/jobs").json()) == [jobs[2], jobs[0]]


@pytest.mark.parametrize(
    "query, param, message",
    [
        ("limit=0", "limit", "limit must be between 1 and 100, got 0"),
        ("limit=101", "limit", "limit must be between 1 and 100, got 101"),
        ("limit=ten", "limit", "limit must be an integer, got 'ten'"),
        ("status=done", "status", "status must be one of queued, running, succeeded, failed, cancelled, got 'done'"),
        (
            "starting_after=nope",
            "starting_after",
            "starting_after must be the id of one of this API key's jobs of the last 3600 s (a page's "
            "next_starting_after), got 'nope'; leave it out to start from the newest",
        ),
    ],
)
def test_a_bad_page_request_is_a_422_naming_its_parameter(client, query, param, message):
    refused = client.get(f"/v1/jobs?{query}")
    assert refused.status_code == 422
    assert refused.json()["error"] == {"type": "invalid_request_error", "message": message, "param": param}


def test_another_keys_job_is_no_place_to_start_from(client):
    theirs = submit(client, "a black square", OTHER)
    refused = client.get(f"/v1/jobs?starting_after={theirs}").json()["error"]
    assert refused["param"] == "starting_after" and theirs in refused["message"]

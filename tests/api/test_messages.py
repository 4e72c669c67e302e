"""What a caller reads when its request is wrong: the field and what it takes, in JSON's words and never Python's
(no "None", no exception names, no regular expressions), for bodies that are odd as well as for values out of
range; and the HTTP niceties around it (HEAD wherever GET works, one value per form field)."""

from __future__ import annotations

import pytest

from tests.fixtures.gateway import in_process_gateway
from tests.fixtures.tiny_model import published_info

REDIS_URL = "redis://127.0.0.1:6379/7"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client(model_path):
    info = published_info(tokenizer_path=str(model_path / "tokenizer"))
    with in_process_gateway(REDIS_URL, "messages-key", info, max_queue_per_model=100) as test_client:
        yield test_client


@pytest.mark.parametrize(
    "path, body, message, param",
    [
        ("/v1/generations", b'{"prompt": "x", "num_inference_steps": 2.5}', "num_inference_steps must be an integer, got 2.5", "num_inference_steps"),
        ("/v1/generations", b'{"prompt": "x", "seed": 1e30}', "seed must be between 0 and 9223372036854775807, got 1e+30", "seed"),
        ("/v1/generations", b'{"prompt": "x", "seed": ' + b"9" * 40 + b"}", f"seed must be between 0 and 9223372036854775807, got {'9' * 40}", "seed"),
        ("/v1/generations", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "the body is not valid JSON this server reads: it holds a number of more than 4300 digits", None),
        ("/v1/generations", b"[" * 100_000 + b"]" * 100_000, "the body is not valid JSON this server reads: its arrays or objects nest too deeply", None),
        ("/v1/generations", b'{"prompt": "x",,}', "the body is not valid JSON: Expecting property name enclosed in double quotes at character 15", None),
        ("/v1/generations", '{"prompt": "é"}'.encode("latin-1"), "the body is not valid JSON: it is not UTF-8 text (a compressed body, Content-Encoding gzip or the like, is not accepted)", None),
        ("/v1/trajectories", b'{"kind": null}', "kind must be one of 'forward', 'reverse' or 'guidance_sweep', got null", "kind"),
        ("/v1/trajectories", b'{"kind": ["forward"]}', "kind must be one of 'forward', 'reverse' or 'guidance_sweep', got [\"forward\"]", "kind"),
        ("/v1/images/generations", b'{"prompt": "x", "size": "64X64"}', "size must be WIDTHxHEIGHT in pixels, like 512x512, or auto, got '64X64'", "size"),
        # full-width digits: int() reads them, the rule does not take them
        ("/v1/images/generations", '{"prompt": "x", "size": "０６４x64"}'.encode(), "size must be WIDTHxHEIGHT in pixels, like 512x512, or auto, got '０６４x64'", "size"),
    ],
)  # fmt: skip
def test_a_wrong_body_is_told_in_the_callers_words(client, path, body, message, param):
    answer = client.post(path, content=body, headers=JSON)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == {"type": "invalid_request_error", "message": message, "param": param}


def test_an_unknown_field_is_echoed_cut_in_the_message_and_the_param(client):
    """A 5 MiB field name came back whole in `param` (the message was cut): an answer as large as the request."""
    name = "k" * 200_000
    answer = client.post("/v1/generations", content=b'{"prompt": "x", "' + name.encode() + b'": 1}', headers=JSON)
    error = answer.json()["error"]
    assert answer.status_code == 422 and len(answer.content) < 1000
    assert error["message"].startswith("unknown field 'kkk") and "(200000 characters)" in error["message"]
    assert error["param"].startswith("kkk") and "(200000 characters)" in error["param"] and len(error["param"]) < 120


def test_openai_takes_null_where_openai_does(client):
    """OpenAI's SDK sends n=None and response_format=None when a caller passes them so: they are left out."""
    body = {"prompt": "x", "n": None, "response_format": None, "output_format": None, "num_inference_steps": 0}
    answer = client.post("/v1/images/generations", json=body)
    # past n and response_format: the first field refused is the one that is wrong
    assert answer.status_code == 422 and answer.json()["error"]["param"] == "num_inference_steps"


def test_a_form_field_sent_twice_is_refused_naming_it(client):
    files = {"image": ("a.png", b"\x89PNG", "image/png")}
    data = {"prompt": "x", "num_inference_steps": ["2", "3"]}
    answer = client.post("/v1/images/edits", files=files, data=data)
    assert answer.status_code == 422 and answer.json()["error"] == {
        "type": "invalid_request_error",
        "message": "num_inference_steps: send it once, got 2 values",
        "param": "num_inference_steps",
    }


def test_a_trailing_slash_is_a_404_naming_the_path_without_it_not_a_redirect(client):
    """A redirect's Location is built from the Host header, which the caller chooses."""
    answer = client.get("/v1/jobs/", headers={"host": "evil.example"}, follow_redirects=False)
    assert answer.status_code == 404 and "location" not in answer.headers
    assert answer.json()["error"]["message"] == (
        "no endpoint GET '/v1/jobs/': the endpoints are listed at /docs (without the trailing slash: '/v1/jobs')"
    )


def test_head_answers_wherever_get_does_but_the_event_stream(client):
    job = client.post("/v1/generations", json={"prompt": "x"}).json()
    for path in ("/livez", "/v1/jobs", f"/v1/jobs/{job['id']}", "/v1/models", "/openapi.json", "/docs"):
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and head.headers["content-length"] == got.headers["content-length"], path
    events = client.head(f"/v1/jobs/{job['id']}/events")  # its GET streams until the job ends
    assert events.status_code == 405 and events.headers["allow"] == "GET"
    assert client.head("/v1/nope").status_code == 404


def test_the_openapi_document_states_the_bounds_the_server_holds(client):
    """The largest seed as the integer it is (FastAPI wrote 9.223372036854776e+18, past it), the picture counts
    this deployment allows (LATENTD_MAX_NUM_IMAGES, 8 by default; the schema's 16 is the most any may), and the
    readiness probe's 503."""
    document = client.get("/openapi.json").json()
    components = document["components"]["schemas"]
    seed = next(kind for kind in components["GenerationCreate"]["properties"]["seed"]["anyOf"] if "maximum" in kind)
    assert seed["maximum"] == 2**63 - 1 and isinstance(seed["maximum"], int)
    assert components["GenerationCreate"]["properties"]["num_images"]["maximum"] == 8
    assert components["OpenAIImageRequest"]["properties"]["n"]["maximum"] == 8
    assert "503" in document["paths"]["/readyz"]["get"]["responses"]

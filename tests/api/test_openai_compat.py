"""What OpenAI's client asks of the models and images routes beyond the basics: models.retrieve (GET
/v1/models/{name}) and size "auto". On the real stack: a model is listed while a live worker serves it."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.timeout(120)


def test_one_model_is_retrieved_as_the_list_shows_it(real_stack):
    listed = httpx.get(f"{real_stack.url}/v1/models", headers=real_stack.headers()).json()["data"]
    one = httpx.get(f"{real_stack.url}/v1/models/{real_stack.model}", headers=real_stack.headers())
    assert one.status_code == 200 and one.json() == next(m for m in listed if m["id"] == real_stack.model)
    # the four fields of OpenAI's Model: created is when the served folder's model_index.json was written
    folder_written = (real_stack.model_path / "model_index.json").stat().st_mtime
    assert one.json()["object"] == "model" and one.json()["owned_by"] == "latentd"
    assert one.json()["created"] == int(folder_written)
    missing = httpx.get(f"{real_stack.url}/v1/models/nope", headers=real_stack.headers())
    assert missing.status_code == 404 and missing.json()["error"] == {
        "type": "not_found_error",
        "message": f"no model 'nope' is served now; served models: {real_stack.model}",
        "param": "name",
    }


def test_size_auto_is_the_models_native_size(real_stack):
    body = {"prompt": "a red circle", "size": "auto", "num_inference_steps": 2, "response_format": "b64_json"}
    answer = httpx.post(f"{real_stack.url}/v1/images/generations", json=body, headers=real_stack.headers(), timeout=60)
    assert answer.status_code == 200, answer.text
    model = httpx.get(f"{real_stack.url}/v1/models/{real_stack.model}", headers=real_stack.headers()).json()
    with Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"]))) as picture:
        assert picture.size == (model["native_width"], model["native_height"])

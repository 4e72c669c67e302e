"""A worker that cannot serve says why and exits (EXIT_CANNOT_SERVE), rather than stay up serving nothing: Celery
logs and drops what its worker_init handler raises, before the worker's log is set up. A real worker process."""

from __future__ import annotations

import json

import pytest

from scripts import run_stack
from services.common.jobstore import redis_version_problem
from services.worker.runtime import EXIT_CANNOT_SERVE


@pytest.mark.timeout(180)
def test_a_worker_whose_model_folder_cannot_load_says_why_and_exits(own_redis, tmp_path):
    """Was: the worker stayed up, silent, its model never published, its queue's tasks failing."""
    folder = tmp_path / "half-copied"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    log = tmp_path / "worker.log"
    url = own_redis.rsplit("/", 1)[0] + "/13"
    with open(log, "w") as out:
        proc = run_stack.start_worker(url, folder, concurrency=1, log=out)
        try:
            status = proc.wait(timeout=150)
        finally:
            run_stack.stop([proc])
    said = log.read_text()
    assert status == EXIT_CANNOT_SERVE, said[-2000:]
    assert "latentd worker cannot serve:" in said and "half-copied" in said, said[-2000:]


@pytest.mark.parametrize(
    "version,refused", [("6.2.14", True), ("6.0.0", True), ("7.0.0", False), ("7.4.2", False), ("8.0.1", False)]
)
def test_a_redis_older_than_7_is_refused_naming_what_needs_it(version, refused):
    problem = redis_version_problem({"redis_version": version})
    assert (problem is not None) == refused
    if refused:
        assert problem.startswith(f"Redis 7.0 or later is required (found {version})") and "script flags" in problem

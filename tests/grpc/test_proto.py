"""The generated gRPC code must match the proto: CI fails on drift (make test runs make proto first)."""

import shutil
import subprocess
import sys
from pathlib import Path

from scripts import gen_proto

REPO = Path(__file__).resolve().parents[2]


def run_check(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scripts.gen_proto", "--check", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_checked_in_generation_matches_proto():
    result = run_check(gen_proto.OUT)
    assert result.returncode == 0, result.stderr


def test_check_fails_on_drift(tmp_path):
    out = tmp_path / "grpc_gen"
    shutil.copytree(gen_proto.OUT, out)
    pb2 = out / "latentd" / "v1" / "latentd_pb2.py"
    pb2.write_text(pb2.read_text() + "\n# hand edit\n")
    result = run_check(out)
    assert result.returncode == 1
    assert "latentd_pb2.py" in result.stderr and "make proto" in result.stderr


def test_proto_style():
    from services.common.grpc_gen.latentd.v1 import latentd_pb2

    file = latentd_pb2.DESCRIPTOR
    assert file.package == "latentd.v1"
    for enum in file.enum_types_by_name.values():
        assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED"), enum.name
    service = file.services_by_name["LatentdService"]
    assert {m.name for m in service.methods} == {
        "SubmitGeneration",
        "SubmitTrajectory",
        "GetJob",
        "ListJobs",
        "CancelJob",
        "StreamJobEvents",
        "GenerateStream",
        "GetArtifact",
        "ListModels",
    }
    for method in service.methods:  # one request and one response message per RPC
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"


def test_the_fields_a_grpc_client_may_send_are_the_request_models_fields():
    """protocol's lists of what a submit carries (the gRPC client refuses any other field by name) hold exactly the
    REST request models' fields: a field added to one and not the other fails here, not in a caller's request."""
    from services.common import protocol, rules
    from services.core.schemas import GenerationCreate, TrajectoryCreate

    assert protocol.GENERATION_FIELDS == set(GenerationCreate.model_fields) - set(rules.JOB_FIELDS)
    assert protocol.TRAJECTORY_FIELDS == set(TrajectoryCreate.model_fields) - set(rules.JOB_FIELDS)

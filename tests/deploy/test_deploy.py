"""deploy/ and docker-compose.yml checked by the tools made for them.

Tools: `docker-compose` (Debian package docker-compose, or the `docker compose` plugin),
`promtool` (Debian package prometheus), `kubernetes-validate` (requirements/dev.txt). A test
whose tool is missing is skipped, naming what to install.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "latentd.json"


def _compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, **kw)


def _k8s_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _find(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in _k8s_docs() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert found, f"no {kind} {name or ''} in deploy/k8s"
    return found[0]


# -- docker-compose --------------------------------------------------------------------------


def test_compose_file_is_valid_for_both_profiles():
    compose = _compose_command()
    if compose is None:
        pytest.skip("no compose client: apt-get install docker-compose (or the docker compose plugin)")
    env = {**os.environ, "LATENTD_API_KEYS": "test-key"}
    for profile in ([], ["--profile", "cpu"]):
        result = _run(compose + ["-f", "docker-compose.yml", *profile, "config"], env=env)
        assert result.returncode == 0, result.stderr
        config = yaml.safe_load(result.stdout)
        services = config["services"]
        assert {"redis", "gateway", "grpc", "worker", "prometheus", "grafana"} <= set(services)
        # compose v1 prints every service; v2 only the active profiles' ones.
        assert "worker-cpu" in services or not profile
        if "worker-cpu" in services:
            assert services["worker-cpu"]["profiles"] == ["cpu"]
            assert "deploy" not in services["worker-cpu"], "the CPU worker must not reserve a GPU"
        assert "profiles" not in services["worker"]
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    policy = redis["command"][redis["command"].index("--maxmemory-policy") + 1]
    assert policy == "noeviction"  # any other policy evicts accepted jobs (docs/failures.md, "Redis full")
    gpus = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus[0]["driver"] == "nvidia" and "gpu" in gpus[0]["capabilities"]
    assert "services.worker.heartbeat" in " ".join(services["worker"]["healthcheck"]["test"])
    assert "9464" not in json.dumps(services["gateway"].get("ports", [])), "metrics port must not be public"


def test_compose_refuses_to_start_the_gateway_without_api_keys():
    compose = _compose_command()
    if compose is None:
        pytest.skip("no compose client: apt-get install docker-compose")
    env = {k: v for k, v in os.environ.items() if k != "LATENTD_API_KEYS"}
    result = _run(compose + ["-f", "docker-compose.yml", "config"], env=env)
    assert result.returncode != 0
    assert "LATENTD_API_KEYS" in result.stderr


def test_dockerfiles_run_as_non_root_and_gateway_has_no_torch():
    for name in ("gateway.Dockerfile", "worker.Dockerfile"):
        text = (DEPLOY / "docker" / name).read_text()
        users = re.findall(r"^USER\s+(\S+)", text, re.M)
        assert users and users[-1] not in ("root", "0"), f"{name} must end as a non-root USER"
    gateway = (DEPLOY / "docker" / "gateway.Dockerfile").read_text()
    assert "worker.txt" not in gateway and "torch" not in re.sub(r"#.*", "", gateway)
    api_reqs = (ROOT / "requirements" / "api.txt").read_text() + (ROOT / "requirements" / "common.txt").read_text()
    assert not re.search(r"^(torch|diffusers|transformers)\b", api_reqs, re.M)


# -- Prometheus ------------------------------------------------------------------------------


def test_promtool_accepts_rules_and_config():
    if not shutil.which("promtool"):
        pytest.skip("no promtool: apt-get install --no-install-recommends prometheus")
    rules = _run(["promtool", "check", "rules", str(ALERTS)])
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = _run(["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert config.returncode == 0, config.stdout + config.stderr


def test_alert_rules_fire_as_their_unit_tests_say():
    if not shutil.which("promtool"):
        pytest.skip("no promtool: apt-get install --no-install-recommends prometheus")
    result = _run(["promtool", "test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_cover_the_four_operator_questions():
    alerts = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    exprs = " ".join(r["expr"] for r in alerts.values())
    for metric in (
        "latentd_queue_depth",
        "latentd_workers_live",
        "latentd_job_failures_total",
        "latentd_queue_wait_seconds_bucket",
    ):
        assert metric in exprs, f"no alert on {metric}"


def test_prometheusrule_matches_the_compose_rules_file(tmp_path):
    rule = _find("PrometheusRule")
    compose_groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert rule["spec"]["groups"] == compose_groups
    if shutil.which("promtool"):
        extracted = tmp_path / "rules.yml"
        extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
        result = _run(["promtool", "check", "rules", str(extracted)])
        assert result.returncode == 0, result.stdout + result.stderr


# -- Kubernetes ------------------------------------------------------------------------------


def test_kubernetes_manifests_pass_schema_validation():
    kv = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    if not Path(kv).exists():
        pytest.skip("no kubernetes-validate: pip install -r requirements/dev.txt")
    builtin = [p for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]
    result = _run([kv, "--strict", "--no-warn", *map(str, builtin)])
    assert result.returncode == 0, result.stdout + result.stderr
    passed = result.stdout.count(" passed for resource ")
    builtin_docs = [
        d
        for p, d in _k8s_docs()
        if "." not in d["apiVersion"].split("/")[0] or d["apiVersion"].startswith(("apps/", "autoscaling/"))
    ]
    assert passed == len(builtin_docs), result.stdout


def test_kustomization_lists_every_manifest_but_the_secret_example():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "redis-secret.example.yaml"}
    assert listed == present


def test_worker_deployment_requests_a_gpu_and_probes_the_heartbeat():
    worker = _find("Deployment", "latentd-worker-shapes-ldm")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    check = ["python", "-m", "services.worker.heartbeat"]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == check + ["--check"]
    assert container["livenessProbe"]["exec"]["command"] == check + ["--liveness"]  # Redis away: no restart
    redis_env = next(e for e in container["env"] if e["name"] == "LATENTD_REDIS_URL")
    assert redis_env["valueFrom"]["secretKeyRef"]["name"] == "latentd-redis"
    assert worker["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_keda_scales_the_worker_deployment_on_its_queue():
    scaled = _find("ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]["name"]
    worker = _find("Deployment", target)
    model = worker["metadata"]["labels"]["latentd.io/model"]
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == f"latentd.{model}"
    assert int(trigger["metadata"]["listLength"]) >= 1
    auth = _find("TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} >= {"address"}
    assert scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]


def test_podmonitor_port_exists_on_every_pod_it_selects():
    monitor = _find("PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoints = [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
    selected = [
        d
        for _, d in _k8s_docs()
        if d["kind"] == "Deployment" and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(selected) >= 2
    ports_of = {
        d["metadata"]["name"]: {
            p["name"] for c in d["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])
        }
        for d in selected
    }
    for name, ports in ports_of.items():
        assert "metrics" in ports, name  # every gateway and worker pod is scraped
    for port in endpoints:
        assert any(port in ports for ports in ports_of.values()), f"PodMonitor port {port} is on no pod"


def test_hpa_targets_the_gateway():
    hpa = _find("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == _find("Deployment", "latentd-gateway")["metadata"]["name"]


# -- Grafana and metric names ----------------------------------------------------------------

METRIC_TOKEN = re.compile(r"\b((?:latentd|process)_[a-z0-9_]+)\b")


def _defined_metric_names() -> set[str]:
    """Sample names the metrics modules expose (histograms: _bucket/_sum/_count too)."""
    from prometheus_client import REGISTRY, generate_latest

    import services.api.metrics as api_metrics

    # registers the counters both doors share, and the webhook sender's (both doors run one)
    import services.core.metrics
    import services.core.webhooks  # noqa: F401
    import services.worker.metrics as worker_metrics

    names = set()
    for collector in list(REGISTRY._collector_to_names):
        describe = getattr(collector, "describe", None)
        families = describe() if describe else []
        for family in families:
            names.add(family.name)
            if family.type == "histogram":
                names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
            if family.type == "counter":
                names.add(family.name + "_total")
    for line in generate_latest(REGISTRY).decode().splitlines():
        if line.startswith("# TYPE"):
            names.add(line.split()[2])
    # collectors installed at run time by the gateway
    names |= {f.name for f in api_metrics.QueueDepthCollector._families()}
    names.add(worker_metrics.GpuMemoryCollector._family().name)
    return names


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def test_dashboard_and_alerts_query_only_defined_metrics():
    defined = _defined_metric_names()
    rule_exprs = [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    used = {m for e in _dashboard_exprs() + rule_exprs for m in METRIC_TOKEN.findall(e)}
    assert used, "no metric found in the queries"
    missing = sorted(used - defined)
    assert not missing, f"queried but not defined in services/*/metrics.py: {missing}"


def test_dashboard_shows_what_operators_need():
    exprs = " ".join(_dashboard_exprs())
    for metric in (
        "latentd_queue_depth",
        "latentd_queue_wait_seconds_bucket",
        "latentd_job_run_seconds_bucket",
        "latentd_images_total",
        "latentd_batch_rows",
        "latentd_unet_step_seconds_bucket",
        "latentd_job_failures_total",
        "latentd_gpu_memory_bytes",
    ):
        assert metric in exprs, f"dashboard lacks {metric}"
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/latentd.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_gateway_code_imports_without_torch():
    """What the slim gateway image runs must not need the worker's heavy packages."""
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'diffusers', 'transformers'):\n"
        "            raise ImportError(f'{name} is not in the gateway image')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import services.api.app, services.api.metrics, services.api.__main__\n"
        "try:\n"
        "    import services.common.grpc_gen.latentd.v1.latentd_pb2\n"
        "except ModuleNotFoundError:\n"
        "    pass  # stubs not generated here (make proto); the image generates them\n"
        "else:\n"
        "    import services.api.grpc_server\n"
        "print('ok')\n"
    )
    result = _run([sys.executable, "-c", blocker])
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_dockerfiles_copy_what_the_processes_import():
    gateway = (DEPLOY / "docker" / "gateway.Dockerfile").read_text()
    for path in ("services/", "proto/"):
        assert f"COPY {path}" in gateway, f"gateway image lacks {path}"
    assert "COPY client/" not in gateway, "the gateway never imports the client package"
    assert "scripts.gen_proto" in gateway, "the gRPC stubs are git-ignored: the image must generate them"
    worker = (DEPLOY / "docker" / "worker.Dockerfile").read_text()
    assert "services.worker.celery_app" in worker and "--pool threads" in worker


def test_the_orchestrators_wait_longer_than_the_workers_drain():
    """SIGTERM drains a worker for up to LATENTD_DRAIN_GRACE_S, then requeues what is left and exits 0: compose
    and Kubernetes must wait longer than that before their SIGKILL (docs/failures.md)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grace_s = float(compose["x-latentd-env"]["LATENTD_DRAIN_GRACE_S"])
    assert grace_s == Settings().drain_grace_s
    for name in ("worker", "worker-cpu"):
        stop = compose["services"][name]["stop_grace_period"]
        assert stop.endswith("s") and float(stop[:-1]) >= grace_s + 10, (name, stop)
    worker = _find("Deployment", "latentd-worker-shapes-ldm")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in worker["containers"][0]["env"]}
    assert float(env["LATENTD_DRAIN_GRACE_S"]) == grace_s
    assert worker["terminationGracePeriodSeconds"] >= grace_s + 10

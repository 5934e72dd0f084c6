"""Offline validation of the deployment files: docker-compose.yml against Docker Compose
itself and the compose-spec schema, the rendered Kustomize overlays against the Kubernetes
OpenAPI schemas, the Dockerfile with hadolint — plus the promises the files make that no
schema checks (probes, drain times, non-root, GPUs, volumes, and RLHF_* variables that the
services really read). The tools are wheels of the dev extra, run from the venv."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from rlhf.cli import SERVICES

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["cpu-demo", "gpu"]
GRPC_PORTS = {"generator": 50051, "reward": 50052, "reference": 50053, "learner": 50054, "rollout": 50055}
# the second workload of the reward service: scorer-only replicas (RLHF_REWARD_ROLE=scorer)
# beside the trainer, in Kubernetes and in compose alike
SCORER = "reward-scorer"
REWARD_STORE = "/var/lib/rlhf/weights/reward"
SETTINGS = {
    "generator": "GeneratorSettings",
    "reward": "RewardSettings",
    "reference": "ReferenceSettings",
    "learner": "LearnerSettings",
    "rollout": "RolloutSettings",
    "gateway": "GatewaySettings",
}


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)


def settings_env(service: str) -> set[str]:
    """The RLHF_* variables a service reads: its pydantic-settings fields, prefixed."""
    cls = getattr(importlib.import_module(f"services.{service}.settings"), SETTINGS[service])
    return {f"RLHF_{name.upper()}" for name in cls.model_fields}


def unknown_rlhf_vars(service: str, env: dict[str, str]) -> list[str]:
    return sorted(k for k in env if k.startswith("RLHF_") and k not in settings_env(service))


# ---- docker-compose ---------------------------------------------------------------------------


def compose_config(profile: str) -> dict:
    """The resolved file, with the defaults of every ${VAR}: nothing of this shell leaks in."""
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    result = run(
        str(BIN / "docker-compose"),
        "-f",
        "docker-compose.yml",
        "--profile",
        profile,
        "config",
        "--format",
        "json",
        env=clean,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def compose(request) -> tuple[str, dict]:
    return request.param, compose_config(request.param)


def rlhf_services(cfg: dict) -> dict[str, tuple[str, dict]]:
    """{compose service: (rlhf service it runs, its config)} for `rlhf serve <name>` containers."""
    out = {}
    for name, svc in cfg["services"].items():
        cmd = svc.get("command") or []
        if cmd[:1] == ["serve"]:
            out[name] = (cmd[1], svc)
    return out


def test_compose_file_matches_the_compose_spec_schema():
    result = run(str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_every_service_with_health_checks(compose):
    profile, cfg = compose
    services = rlhf_services(cfg)
    assert sorted({s for s, _ in services.values()}) == sorted(SERVICES)
    for name, (service, svc) in services.items():
        assert service in SERVICES, name
        assert svc["healthcheck"]["test"] and not svc["healthcheck"].get("disable"), name
        assert svc["depends_on"], f"{name} starts without waiting for anything"
        for dep, cond in svc["depends_on"].items():
            assert cond["condition"] in {"service_healthy", "service_completed_successfully"}, (name, dep)
        env = svc["environment"]
        assert env["RLHF_HOST"] == "0.0.0.0", name
        assert env["RLHF_KAFKA_BOOTSTRAP"] == "kafka:9092", name
        assert float(env["RLHF_DRAIN_SECONDS"]) < _seconds(svc["stop_grace_period"]), name
        if service != "gateway":  # the gRPC health check reads the port the service binds
            assert int(env["RLHF_PORT"]) == GRPC_PORTS[service], name
            assert "rlhf health 127.0.0.1:$$RLHF_PORT" in " ".join(svc["healthcheck"]["test"]), name


def test_compose_sets_only_variables_the_services_read(compose):
    _, cfg = compose
    wrong = {
        name: unknown_rlhf_vars(service, svc["environment"])
        for name, (service, svc) in rlhf_services(cfg).items()
        if unknown_rlhf_vars(service, svc["environment"])
    }
    assert wrong == {}, f"RLHF_* variables no setting reads (typo, or a setting that was renamed): {wrong}"


def test_compose_kafka_is_apache_kraft_single_node_with_a_durable_volume(compose):
    _, cfg = compose
    kafka = cfg["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert set(kafka["environment"]["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    data = kafka["environment"]["KAFKA_LOG_DIRS"]
    assert any(v["type"] == "volume" and v["target"] == data for v in kafka["volumes"])
    assert kafka["healthcheck"]["test"]


def test_compose_named_volumes_for_weights_checkpoints_outbox(compose):
    _, cfg = compose
    mounts = {
        name: {v["source"]: v["target"] for v in svc.get("volumes", []) if v["type"] == "volume"}
        for name, (_, svc) in rlhf_services(cfg).items()
    }
    assert mounts["learner"]["weights"] == "/var/lib/rlhf/weights"
    assert mounts["learner"]["learner-checkpoints"] == "/var/lib/rlhf"
    assert mounts["reward"]["reward-checkpoints"] == "/var/lib/rlhf"
    assert mounts["reward"]["weights"] == mounts[SCORER]["weights"] == "/var/lib/rlhf/weights"
    assert mounts["gateway"]["gateway-outbox"] == "/var/lib/rlhf"
    generator = next(m for n, m in mounts.items() if n.startswith("generator"))
    assert generator["weights"] == "/var/lib/rlhf/weights"
    assert {"weights", "learner-checkpoints", "reward-checkpoints", "gateway-outbox", "kafka-data"} <= set(
        cfg["volumes"]
    )


def test_compose_profiles_pick_a_cpu_or_a_gpu_generator(compose):
    profile, cfg = compose
    generators = [n for n, (s, _) in rlhf_services(cfg).items() if s == "generator"]
    assert len(generators) == 1, generators
    gen = cfg["services"][generators[0]]
    devices = gen.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if profile == "gpu":
        assert gen["environment"]["RLHF_BACKEND"] == "vllm"
        assert gen["build"]["target"] == "cuda"
        assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert "generator" in gen["networks"]["default"]["aliases"]
    else:
        assert gen["build"]["target"] == "cpu" and not devices


def test_compose_monitoring_mounts_exist(compose):
    _, cfg = compose
    for name in ("prometheus", "grafana"):
        for v in cfg["services"][name]["volumes"]:
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), (name, v["source"])


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)


# ---- Kubernetes -------------------------------------------------------------------------------


def render(overlay: str) -> list[dict]:
    result = run(str(BIN / "kubectl"), "kustomize", str(K8S / "overlays" / overlay))
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def manifests(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def by_kind(docs: list[dict], *kinds: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in kinds}


def rlhf_workloads(docs: list[dict]) -> dict[str, tuple[str, dict, dict]]:
    """{workload: (rlhf service, workload, its container)} for `rlhf serve <name>` containers."""
    out = {}
    for name, w in by_kind(docs, "Deployment", "StatefulSet").items():
        for c in w["spec"]["template"]["spec"]["containers"]:
            if c.get("args", [])[:1] == ["serve"]:
                out[name] = (c["args"][1], w, c)
    return out


def test_rendered_manifests_match_the_kubernetes_schemas(manifests):
    _, docs = manifests
    version = kubernetes_validate.latest_version()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on the first error


def test_strict_validation_catches_a_misspelt_field():
    doc = next(d for d in render("cpu-demo") if d["kind"] == "Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_every_service_runs_with_native_probes_and_a_drain_window(manifests):
    _, docs = manifests
    workloads = rlhf_workloads(docs)
    assert sorted(s for n, (s, _, _) in workloads.items() if n != SCORER) == sorted(SERVICES)
    assert workloads[SCORER][0] == "reward"
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("rlhf-config"))[
        "data"
    ]
    for name, (service, w, c) in workloads.items():
        pod = w["spec"]["template"]["spec"]
        if service == "gateway":
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        else:
            port = GRPC_PORTS[service]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["grpc"]["port"] == port, (name, probe)
        pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
        assert pod["terminationGracePeriodSeconds"] > pre_stop + float(config["RLHF_DRAIN_SECONDS"]), name
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], name
        assert c["resources"]["limits"]["memory"], name


def test_pods_run_as_non_root_without_privileges(manifests):
    _, docs = manifests
    for name, w in by_kind(docs, "Deployment", "StatefulSet", "Job").items():
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name


def test_state_lives_in_statefulsets_and_claims(manifests):
    _, docs = manifests
    workloads = rlhf_workloads(docs)
    for service, claim in (("learner", "checkpoints"), ("reward", "checkpoints"), ("gateway", "outbox")):
        w = workloads[service][1]
        assert w["kind"] == "StatefulSet", service
        assert [t["metadata"]["name"] for t in w["spec"]["volumeClaimTemplates"]] == [claim], service
        mounts = {m["name"]: m["mountPath"] for m in workloads[service][2]["volumeMounts"]}
        assert mounts[claim] == "/var/lib/rlhf", service
    assert "weights" in by_kind(docs, "PersistentVolumeClaim")
    for service in ("learner", "generator", "reward", SCORER):
        w = workloads[service][1]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in w["spec"]["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert claims["weights"] == "weights", service


def test_selectors_match_pods(manifests):
    _, docs = manifests
    pods = [w["spec"]["template"] for w in by_kind(docs, "Deployment", "StatefulSet").values()]

    def matches(selector: dict) -> list[dict]:
        return [p for p in pods if selector.items() <= p["metadata"]["labels"].items()]

    for name, svc in by_kind(docs, "Service").items():
        selected = matches(svc["spec"]["selector"])
        assert selected, f"Service {name} selects no pod"
        ports = {p["name"] for t in selected for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (name, port)
    pdbs = by_kind(docs, "PodDisruptionBudget")
    assert {"generator", "reference", SCORER} <= set(pdbs)
    for name, pdb in pdbs.items():
        assert matches(pdb["spec"]["selector"]["matchLabels"]), f"PDB {name} selects no pod"


def test_prometheus_finds_every_service_through_a_metrics_service(manifests):
    """deploy/prometheus/prometheus-k8s.yml resolves <job>-metrics.rlhf.svc: each must be a
    headless Service that publishes not-ready pods, on the port the scrape config uses."""
    _, docs = manifests
    services = by_kind(docs, "Service")
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus-k8s.yml").read_text())
    for job in scrape["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for dns in sd["names"]:
                name, namespace = dns.split(".")[:2]
                svc = services[name]
                assert svc["metadata"]["namespace"] == namespace
                assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
                assert sd["port"] in {p["port"] for p in svc["spec"]["ports"]}, (job["job_name"], sd["port"])


def test_kubernetes_sets_only_variables_the_services_read(manifests):
    _, docs = manifests
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("rlhf-config"))[
        "data"
    ]
    wrong = {}
    for name, (service, _, c) in rlhf_workloads(docs).items():
        env = {**config, **{e["name"]: e.get("value") for e in c.get("env", [])}}
        if unknown_rlhf_vars(service, env):
            wrong[name] = unknown_rlhf_vars(service, env)
    assert wrong == {}, f"RLHF_* variables no setting reads: {wrong}"


def test_gpu_overlay_puts_generators_and_learner_on_gpus():
    docs = render("gpu")
    workloads = rlhf_workloads(docs)
    for service in ("generator", "learner"):
        c = workloads[service][2]
        assert c["image"].endswith(":cuda"), service
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1", service
        tolerations = workloads[service][1]["spec"]["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), service
    assert {e["name"]: e["value"] for e in workloads["generator"][2]["env"]}["RLHF_BACKEND"] == "vllm"
    assert by_kind(docs, "PersistentVolumeClaim")["weights"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_cpu_demo_overlay_needs_no_gpu_and_brings_its_kafka():
    docs = render("cpu-demo")
    assert "nvidia.com/gpu" not in json.dumps(docs)
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("rlhf-config"))[
        "data"
    ]
    host, port = config["RLHF_KAFKA_BOOTSTRAP"].split(":")
    kafka_svc = by_kind(docs, "Service")[host]
    assert int(port) in {p["port"] for p in kafka_svc["spec"]["ports"]}
    kafka = by_kind(docs, "StatefulSet")["rlhf-kafka"]
    assert kafka["spec"]["template"]["spec"]["containers"][0]["image"].startswith("apache/kafka:")


def test_strimzi_example_serves_the_configured_bootstrap():
    docs = list(yaml.safe_load_all((K8S / "kafka" / "strimzi-kafka.yaml").read_text()))
    kafka = next(d for d in docs if d["kind"] == "Kafka")
    assert kafka["apiVersion"].startswith("kafka.strimzi.io/")
    assert kafka["metadata"]["annotations"]["strimzi.io/kraft"] == "enabled"
    pool = next(d for d in docs if d["kind"] == "KafkaNodePool")
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    listener = kafka["spec"]["kafka"]["listeners"][0]
    bootstrap = f"{kafka['metadata']['name']}-kafka-bootstrap:{listener['port']}"
    config = next(d for d in render("gpu") if d["kind"] == "ConfigMap")["data"]
    assert config["RLHF_KAFKA_BOOTSTRAP"] == bootstrap


# ---- the image --------------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[str]]:
    stages, current = {}, None
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(1)
            stages[current] = []
        elif current and line.strip() and not line.lstrip().startswith("#"):
            stages[current].append(line.strip())
    return stages


def test_hadolint_passes():
    result = run(str(BIN / "hadolint"), "--no-color", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_has_cpu_and_cuda_targets_that_run_as_non_root():
    stages = dockerfile_stages()
    assert list(stages)[-1] == "cpu", "the default target (last stage) should be the CPU image"
    for target in ("cpu", "cuda"):
        users = [line.split()[1] for line in stages[target] if line.upper().startswith("USER ")]
        assert users and users[-1].split(":")[0] == "10001", target
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "rlhf"]' in text


def test_build_context_holds_what_the_dockerfile_copies():
    """.dockerignore starts from "*" and re-includes paths: each COPY source must be one."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[[i for i, line in enumerate(ignore) if line and not line.startswith("#")][0]] == "*"
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert src.rstrip("/") in included, src
                assert (ROOT / src).exists(), src


def test_topic_creation_command_runs_against_a_broker(tmp_path):
    """The one-shot topic command of compose and of the Kubernetes Job, run for real
    against the embedded broker: every topic of the loop exists afterwards."""
    from kafka import KafkaAdminClient

    from rlhf.broker import EmbeddedBroker
    from rlhf.bus.topics import Topics
    from tests.procs import free_port

    compose_args = compose_config("cpu")["services"]["kafka-topics"]["command"]
    job = by_kind(render("cpu-demo"), "Job")["kafka-topics"]["spec"]["template"]["spec"]["containers"][0]
    assert compose_args[0] == job["args"][0] == "topics"  # run by the image's `rlhf` entrypoint
    broker = EmbeddedBroker(port=free_port(), log_path=tmp_path / "broker.log")
    broker.start()
    try:
        for i, args in enumerate([compose_args, job["args"]]):
            prefix = f"deploytest{i}"
            # a single-node broker cannot hold 3 replicas: run the Job's arguments at factor 1
            args = [a if prev != "--replication-factor" else "1" for prev, a in zip([None, *args], args)]
            env = {"PATH": str(BIN), "RLHF_KAFKA_BOOTSTRAP": broker.bootstrap, "RLHF_TOPIC_PREFIX": prefix}
            result = run(sys.executable, "-m", "rlhf.cli", *args, env=env)
            assert result.returncode == 0, result.stdout + result.stderr
            admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
            try:
                assert set(Topics(prefix).all()) <= set(admin.list_topics())
            finally:
                admin.close()
    finally:
        broker.stop()


# ---- the guide --------------------------------------------------------------------------------


def test_every_compose_variable_is_documented():
    """Configuration is documented in one place: docs/deployment.md names each ${VAR}."""
    doc = (ROOT / "docs" / "deployment.md").read_text()
    variables = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (ROOT / "docker-compose.yml").read_text()))
    assert variables and sorted(v for v in variables if f"`{v}`" not in doc) == []
    # RLHF_* names pass settings through: each must be a setting some service reads
    every_setting = set().union(*(settings_env(s) for s in SERVICES))
    assert sorted(v for v in variables if v.startswith("RLHF_") and v not in every_setting) == []


def test_learner_ranks_overlay_runs_torchrun_with_a_gpu_per_rank():
    """overlays/gpu-learner-ranks: the GPU overlay with the learner as torchrun ranks in its
    pod (rlhf/learner/distributed.py): as many ranks as GPUs, the service's own module, valid
    objects, only settings the learner reads, shared memory for NCCL."""
    docs = render("gpu-learner-ranks")
    version = kubernetes_validate.latest_version()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    learner = by_kind(docs, "StatefulSet")["learner"]
    c = learner["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["/usr/bin/tini", "--", "torchrun"]
    args = c["args"]
    assert args[-2:] == ["-m", "services.learner"] and "--standalone" in args
    ranks = args[args.index("--nproc-per-node") + 1]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == ranks
    assert int(ranks) >= 2
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/dev/shm", "/var/lib/rlhf", "/var/lib/rlhf/weights"}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert unknown_rlhf_vars("learner", env) == []
    assert env["RLHF_PORT"] == str(GRPC_PORTS["learner"])  # rank 0 serves where the probes look
    assert c["readinessProbe"]["grpc"]["port"] == GRPC_PORTS["learner"]
    assert rlhf_workloads(docs).keys() == rlhf_workloads(render("gpu")).keys() - {"learner"}


def test_clients_spread_over_every_generator_reference_and_reward_pod(manifests):
    """The gateway and the rollout worker reach the generators, reference and reward servers through
    dns:/// addresses of headless Services (round_robin over every ready pod,
    rlhf/serving/client.py), not a ClusterIP that pins each connection to one pod."""
    _, docs = manifests
    services = by_kind(docs, "Service")
    workloads = rlhf_workloads(docs)
    wanted = {
        "gateway": ["RLHF_GENERATOR_ADDR", "RLHF_REWARD_ADDR"],
        "rollout": ["RLHF_GENERATOR_ADDR", "RLHF_REFERENCE_ADDR", "RLHF_REWARD_ADDR"],
    }
    for service, variables in wanted.items():
        env = {e["name"]: e.get("value") for e in workloads[service][2]["env"]}
        for var in variables:
            target = env[var]
            assert target.startswith("dns:///"), (service, var, target)
            host, port = target.removeprefix("dns:///").split(":")
            svc = services[host.split(".")[0]]
            assert svc["spec"]["clusterIP"] == "None", host
            assert not svc["spec"].get("publishNotReadyAddresses"), host  # only ready pods get calls
            assert int(port) in {p["port"] for p in svc["spec"]["ports"]}, target


def container_env(c: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def test_reward_pods_are_the_trainer_and_the_scorers(manifests):
    """Score is served by the reward trainer (StatefulSet reward) and by scorer replicas
    (Deployment reward-scorer, RLHF_REWARD_ROLE=scorer): the headless Service reward-pods
    selects exactly those pods, the rollout worker and the gateway dial it, and both roles
    point RLHF_REWARD_STORE at the same folder of the shared weights claim, the scorers
    read-only. The ClusterIP Service and the metrics Service of each stay with their own pods."""
    _, docs = manifests
    services = by_kind(docs, "Service")
    workloads = rlhf_workloads(docs)
    pods = {name: w["spec"]["template"] for name, w in by_kind(docs, "Deployment", "StatefulSet").items()}

    def selected(service: str) -> set[str]:
        selector = services[service]["spec"]["selector"]
        return {name for name, p in pods.items() if selector.items() <= p["metadata"]["labels"].items()}

    pool = services["reward-pods"]["spec"]
    assert pool["clusterIP"] == "None" and not pool.get("publishNotReadyAddresses")
    assert [p["port"] for p in pool["ports"]] == [GRPC_PORTS["reward"]]
    assert selected("reward-pods") == {"reward", SCORER}
    assert selected("reward") == selected("reward-metrics") == {"reward"}
    assert selected(f"{SCORER}-metrics") == {SCORER}
    for client in ("rollout", "gateway"):
        assert container_env(workloads[client][2])["RLHF_REWARD_ADDR"] == "dns:///reward-pods:50052", client

    trainer, scorer = workloads["reward"], workloads[SCORER]
    assert trainer[1]["kind"] == "StatefulSet" and trainer[1]["spec"]["replicas"] == 1
    assert scorer[1]["kind"] == "Deployment" and scorer[1]["spec"]["replicas"] >= 1
    assert scorer[2]["args"] == ["serve", "reward"]
    assert container_env(scorer[2])["RLHF_REWARD_ROLE"] == "scorer"
    assert container_env(trainer[2]).get("RLHF_REWARD_ROLE", "trainer") == "trainer"
    for name, (_, w, c) in (("reward", trainer), (SCORER, scorer)):
        assert container_env(c)["RLHF_REWARD_STORE"] == REWARD_STORE, name
        assert container_env(c)["RLHF_PORT"] == str(GRPC_PORTS["reward"]), name
        volumes = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        # the innermost mount holds the store (the trainer's checkpoints are at /var/lib/rlhf)
        mount = max(
            (m for m in c["volumeMounts"] if REWARD_STORE.startswith(m["mountPath"] + "/")),
            key=lambda m: len(m["mountPath"]),
        )
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "weights", name
        assert mount.get("readOnly", False) is (name == SCORER), name
    # stateless apart from the store: no claim of its own, nothing else written but emptyDirs
    assert "volumeClaimTemplates" not in scorer[1]["spec"]
    scorer_volumes = {v["name"]: v for v in scorer[1]["spec"]["template"]["spec"]["volumes"]}
    for m in scorer[2]["volumeMounts"]:
        assert m.get("readOnly") or "emptyDir" in scorer_volumes[m["name"]], m
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus-k8s.yml").read_text())
    names = {
        j["job_name"]: [n for sd in j.get("dns_sd_configs", []) for n in sd["names"]] for j in scrape["scrape_configs"]
    }
    assert names[SCORER] == [f"{SCORER}-metrics.rlhf.svc.cluster.local"]


def test_compose_reward_pool_is_the_trainer_and_the_scorers(compose):
    """compose: the trainer (reward) and the scorers (reward-scorer, 0 replicas unless
    `--scale reward-scorer=N`) share the network alias reward-pool, which the rollout worker
    and the gateway dial as dns:///reward-pool (every container with the alias); both roles
    use one RLHF_REWARD_STORE on the weights volume, the scorers read-only."""
    _, cfg = compose
    services = cfg["services"]
    with_alias = {
        name
        for name, svc in services.items()
        if "reward-pool" in (((svc.get("networks") or {}).get("default") or {}).get("aliases") or [])
    }
    assert with_alias == {"reward", SCORER}
    for client in ("rollout", "gateway"):
        assert services[client]["environment"]["RLHF_REWARD_ADDR"] == "dns:///reward-pool:50052", client
    trainer, scorer = services["reward"], services[SCORER]
    assert scorer["command"] == ["serve", "reward"]
    assert scorer["environment"]["RLHF_REWARD_ROLE"] == "scorer"
    assert trainer["environment"].get("RLHF_REWARD_ROLE", "trainer") == "trainer"
    assert scorer["deploy"]["replicas"] == 0  # none unless scaled
    assert scorer["depends_on"]["reward"]["condition"] == "service_healthy"
    for name, svc in (("reward", trainer), (SCORER, scorer)):
        assert svc["environment"]["RLHF_REWARD_STORE"] == REWARD_STORE, name
        assert svc["environment"]["RLHF_PORT"] == str(GRPC_PORTS["reward"]), name
        weights = next(v for v in svc["volumes"] if v["type"] == "volume" and v["source"] == "weights")
        assert REWARD_STORE.startswith(weights["target"] + "/"), name
        assert bool(weights.get("read_only")) is (name == SCORER), name
    assert [v["source"] for v in scorer["volumes"]] == ["weights"]  # stateless apart from the store

"""The rendered objects against what the service needs: resources and probes everywhere,
the TorchServe sidecar, ports and settings that match the server's own, consistent grace
periods, and network policies that allow exactly the intended flows."""

from __future__ import annotations

import base64
import fnmatch
import os
import re
import urllib.parse
from typing import Any

import pytest

from feature_cache.settings import FeatureCacheSettings
from k8s.render import Object, containers, find, load, one, pod_spec, render_topics
from quality.settings import QualitySettings
from server.audit.journal import SEGMENT_MAX_BYTES
from server.front import DECISION_SERVICE
from server.settings import ARCHIVE_VERSION, Settings
from torchserve.container import CONTAINER_PORTS
from torchserve.replica import role_section

WORKLOADS = ("decision", "model-secondary", "model-challenger", "feature-cache")
# The primary sidecar's container and image, and what its argument names, by model server.
SIDECARS = {"torchserve": ("model-server", "primary"), "triton": ("triton-server", "champion")}


def config_env(objects: list[Object]) -> dict[str, str]:
    (config,) = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("decision-config")
    ]
    data: dict[str, str] = config["data"]
    return data


def container(objects: list[Object], workload: str, name: str) -> Object:
    (found,) = [c for c in containers(one(objects, "Deployment", workload)) if c["name"] == name]
    return found


def ports(c: Object) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def settings_from(
    model: type[Settings] | type[FeatureCacheSettings] | type[QualitySettings],
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Any:
    """``model`` as the container's environment makes it. A misspelt field of a section
    the model has is an error (extra="forbid" in every section), not a silent default;
    a section the model lacks is ignored (one environment serves every process), which
    ``test_every_variable_is_a_setting_of_some_process`` covers."""
    with monkeypatch.context() as patched:
        for name in [n for n in os.environ if n.startswith("DECISION_")]:
            patched.delenv(name)
        for name, value in env.items():
            patched.setenv(name, value)
        return model()


def container_env(objects: list[Object], workload: str, name: str) -> dict[str, str]:
    """The container's DECISION_* environment: the ConfigMap, then its own entries (a
    Secret's value stands in as a placeholder of the right form)."""
    c = container(objects, workload, name)
    env = {k: v for k, v in config_env(objects).items()}
    for entry in c.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            env[entry["name"]] = {
                "DECISION_REDIS__URL": "redis://redis.example:6379/0",
                "DECISION_AUDIT__DATABASE_URL": "postgresql+psycopg://decision@pg.example/db",
                "DECISION_ADMIN__TOKENS": "oncall operator " + "t" * 32,
                "POD_IP": "10.0.0.7",  # the downward API's
            }[entry["name"]]
    return {k: v for k, v in env.items() if k.startswith("DECISION_")}


def is_sidecar(c: Object) -> bool:
    return c.get("restartPolicy") == "Always"


def test_every_container_has_requests_limits_and_probes(objects: list[Object]) -> None:
    for workload in WORKLOADS:
        for c in containers(one(objects, "Deployment", workload)):
            where = f"{workload}/{c['name']}"
            resources = c["resources"]
            wanted = {"cpu", "memory", "ephemeral-storage"}
            assert wanted <= resources["requests"].keys(), where
            assert wanted <= resources["limits"].keys(), where
            assert {"livenessProbe", "startupProbe"} <= c.keys(), where
            # A native sidecar's readiness would be the pod's: the primary's worker
            # restarting must not take the pod out of its Services.
            assert ("readinessProbe" in c) != is_sidecar(c), where
            context = c["securityContext"]
            assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
            assert context["capabilities"]["drop"] == ["ALL"], where
        assert pod_spec(one(objects, "Deployment", workload))["securityContext"]["runAsNonRoot"]


def test_the_drift_references_are_the_sidecars_archives(objects: list[Object]) -> None:
    """A plain init container copies the model-server image's archives into the folder
    the server reads its drift references from, before the sidecar starts."""
    spec = pod_spec(one(objects, "Deployment", "decision"))
    first, second = spec["initContainers"]
    assert first["name"] == "model-references" and not is_sidecar(first)
    assert second["name"] in SIDECARS
    assert first["image"] == second["image"]
    store = config_env(objects)["DECISION_DRIFT__MODEL_STORE"]
    assert first["command"][0] == "cp" and first["command"][-1].rstrip("/") == store
    server = container(objects, "decision", "decision-server")
    mount = next(m for m in server["volumeMounts"] if m["mountPath"] == store)
    assert mount["readOnly"]
    assert [m["name"] for m in first["volumeMounts"]] == [mount["name"]]
    assert first["resources"]["limits"] and first["securityContext"]["readOnlyRootFilesystem"]
    assert not {"livenessProbe", "readinessProbe", "startupProbe"} & first.keys()


def test_the_decision_pod_runs_the_primary_as_a_native_sidecar(objects: list[Object]) -> None:
    spec = pod_spec(one(objects, "Deployment", "decision"))
    (sidecar,) = [c for c in spec["initContainers"] if is_sidecar(c)]
    image, argument = SIDECARS[sidecar["name"]]
    assert sidecar["image"].split("/")[-1].startswith(image)
    assert sidecar["args"] == [argument]
    # The server reaches it over loopback, on the port the image serves gRPC on.
    assert ports(sidecar)["ts-grpc"] == CONTAINER_PORTS.grpc_inference
    assert ports(sidecar)["ts-rest"] == CONTAINER_PORTS.rest_inference
    assert ports(sidecar)["ts-metrics"] == CONTAINER_PORTS.rest_metrics
    env = config_env(objects)
    assert env["DECISION_TORCHSERVE__PRIMARY_ADDRESS"] == f"127.0.0.1:{ports(sidecar)['ts-grpc']}"
    assert sidecar["startupProbe"]["httpGet"]["port"] == "ts-rest"
    # No other container of the pod is a model server: the challenger never is.
    assert [c["name"] for c in spec["containers"]] == ["decision-server"]


def test_torchserve_is_probed_with_a_prediction_of_its_roles_model(objects: list[Object]) -> None:
    """TorchServe's /ping says Healthy while a worker it never started again leaves every
    call waiting (0.12; tests/server/test_abandoned_calls.py): readiness and liveness ask
    for a prediction of the role's model instead (tests/torchserve/test_served.py)."""
    probed = []
    for workload in ("decision", "model-secondary", "model-challenger"):
        for c in containers(one(objects, "Deployment", workload)):
            if c["name"] != "torchserve":
                continue  # the mlserver component's challenger has health endpoints
            (role,) = c["args"]
            model = re.search(r"^load_models=(\w+)=", role_section(role), re.MULTILINE)
            assert model, role
            prediction = {"path": f"/predictions/{model[1]}", "port": "ts-rest"}
            for probe in ("readinessProbe", "livenessProbe"):
                if probe in c:  # (the sidecar has no readiness probe)
                    assert c[probe]["httpGet"] == prediction, f"{workload} {probe}"
                    assert c[probe]["timeoutSeconds"] >= 2, f"{workload} {probe}"
            probed.append(role)
    triton = any(
        c["name"] == "triton" for c in containers(one(objects, "Deployment", "model-secondary"))
    )  # the triton component: every replica has Triton's health endpoints
    assert triton or {"primary", "secondary"} <= set(probed)


def test_the_replicas_addresses_are_their_services(objects: list[Object]) -> None:
    env = config_env(objects)
    for role in ("secondary", "challenger"):
        service = one(objects, "Service", f"model-{role}")
        (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "ts-grpc"]
        assert env[f"DECISION_TORCHSERVE__{role.upper()}_ADDRESS"] == (
            f"model-{role}:{grpc_port['port']}"
        )
        workload = one(objects, "Deployment", f"model-{role}")
        assert service["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]
        (model_server,) = containers(workload)
        assert ports(model_server)[grpc_port["targetPort"]] == CONTAINER_PORTS.grpc_inference
        if model_server["name"] == "torchserve":
            assert model_server["args"] == [role]


def test_the_mlserver_component_swaps_the_challenger_alone(
    rendered: dict[str, list[Object]],
) -> None:
    dev, swapped = rendered["dev"], rendered["dev-mlserver"]
    (mlserver,) = containers(one(swapped, "Deployment", "model-challenger"))
    assert mlserver["name"] == "mlserver" and "args" not in mlserver
    assert mlserver["image"].split("/")[-1].startswith("mlserver-challenger:")
    assert mlserver["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    (torchserve,) = containers(one(dev, "Deployment", "model-challenger"))
    assert ports(mlserver) == ports(torchserve)  # the Service and policies still fit
    env = config_env(swapped)
    assert env["DECISION_TORCHSERVE__CHALLENGER_PROTOCOL"] == "kserve-v2"
    assert "DECISION_TORCHSERVE__PROTOCOL" not in env, "the champion's API is untouched"

    # The rest renders as in dev (workloads name the ConfigMap by its content hash).
    def unchanged(objects: list[Object]) -> list[Object]:
        return [o for o in objects if o["kind"] not in ("ConfigMap", "Deployment", "CronJob")]

    assert unchanged(swapped) == unchanged(dev)


def test_the_triton_component_swaps_every_replica(rendered: dict[str, list[Object]]) -> None:
    dev, swapped = rendered["dev"], rendered["dev-triton"]
    served = {}
    for workload in ("decision", "model-secondary", "model-challenger"):
        (triton,) = [
            c for c in containers(one(swapped, "Deployment", workload)) if c["name"] == "triton"
        ]
        (torchserve,) = [
            c for c in containers(one(dev, "Deployment", workload)) if c["name"] == "torchserve"
        ]
        assert triton["image"].split("/")[-1].startswith("triton-server:")
        assert ports(triton) == ports(torchserve)  # the Services and policies still fit
        assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        for probe in ("startupProbe", "readinessProbe"):
            if probe in torchserve:
                assert triton[probe]["httpGet"]["path"] == "/v2/health/ready", workload
        served[workload] = triton["args"]
    assert served == {
        "decision": ["champion"],
        "model-secondary": ["champion"],
        "model-challenger": ["challenger"],
    }
    (references,) = [
        c
        for c in pod_spec(one(swapped, "Deployment", "decision"))["initContainers"]
        if c["name"] == "model-references"
    ]
    assert references["image"].split("/")[-1].startswith("triton-server:")  # its own archives
    env = config_env(swapped)
    assert env["DECISION_TORCHSERVE__PROTOCOL"] == "kserve-v2"
    assert env["DECISION_TORCHSERVE__MODEL_VERSION"] == ARCHIVE_VERSION


def test_prod_serves_every_replica_with_triton(rendered: dict[str, list[Object]]) -> None:
    """The measured choice (docs/capacity.md): prod's model server is Triton, dev's
    stays TorchServe, as the local stack's."""
    for workload in ("decision", "model-secondary", "model-challenger"):
        prod = {c["name"] for c in containers(one(rendered["prod"], "Deployment", workload))}
        dev = {c["name"] for c in containers(one(rendered["dev"], "Deployment", workload))}
        assert "triton" in prod and "torchserve" not in prod, workload
        assert "torchserve" in dev, workload
    assert config_env(rendered["prod"])["DECISION_TORCHSERVE__PROTOCOL"] == "kserve-v2"


def test_ports_and_environment_match_the_server_settings(
    objects: list[Object], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = container_env(objects, "decision", "decision-server")
    settings: Settings = settings_from(Settings, env, monkeypatch)
    server = container(objects, "decision", "decision-server")
    named = ports(server)
    assert named["grpc"] == settings.server.port
    assert named["admin"] == settings.admin.port
    workers = settings.server.workers
    metrics = sorted(v for k, v in named.items() if k.startswith("metrics-"))
    assert metrics == [settings.server.metrics_port + i for i in range(workers)]
    # One worker per CPU the container is given (it would see the node's otherwise).
    assert workers == cpus(server["resources"]["requests"]["cpu"])
    assert server["resources"]["requests"] == server["resources"]["limits"]
    # Every address binds in the pod; the journal is on its volume.
    assert settings.server.host == settings.admin.host == "0.0.0.0"
    assert settings.telemetry.metrics_host == "0.0.0.0"
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert settings.audit.journal_dir.startswith(mounts["journal"] + "/")
    # The admin tokens come from their Secret, never from the repository.
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in server["env"] if "valueFrom" in e
               and "secretKeyRef" in e["valueFrom"]}  # fmt: skip
    assert secrets["DECISION_ADMIN__TOKENS"] == {"name": "decision-admin-tokens", "key": "tokens"}
    # The fleet list gives the pod's own address, not the wildcard it binds.
    assert settings.admin.advertise_address == f"$(POD_IP):{settings.admin.port}"
    # The Services' ports are the container's.
    for service_name, port_names in {
        "decision": ["grpc"],
        "decision-headless": ["grpc"],
        "decision-admin": ["admin"],
        "decision-metrics": [*(f"metrics-{i}" for i in range(workers)), "ts-metrics"],
    }.items():
        service = one(objects, "Service", service_name)
        assert [p["targetPort"] for p in service["spec"]["ports"]] == port_names
        (sidecar,) = [
            c for c in containers(one(objects, "Deployment", "decision")) if c["name"] in SIDECARS
        ]
        pod_ports = {**named, **ports(sidecar)}
        assert all(p["port"] == pod_ports[p["targetPort"]] for p in service["spec"]["ports"])


def test_every_variable_is_a_setting_of_some_process(objects: list[Object]) -> None:
    """One environment serves the server, the consumer and the labeler: each variable must
    name a field of one of them (a misspelt section would be ignored by all)."""
    for name in config_env(objects):
        section, field = name.removeprefix("DECISION_").lower().split("__")
        owners = [
            root
            for root in (Settings, FeatureCacheSettings, QualitySettings)
            if section in root.model_fields
            and field in root.model_fields[section].annotation.model_fields  # type: ignore[union-attr]
        ]
        assert owners, name


def test_the_consumer_environment_is_its_settings(
    objects: list[Object], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = container_env(objects, "feature-cache", "feature-cache")
    settings: FeatureCacheSettings = settings_from(FeatureCacheSettings, env, monkeypatch)
    consumer = container(objects, "feature-cache", "feature-cache")
    mounts = [m["mountPath"] for m in consumer["volumeMounts"]]
    assert any(settings.feature_cache.alive_file.startswith(m + "/") for m in mounts)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert consumer[probe]["exec"]["command"][:2] == ["feature-cache", "--check-alive"]
    ports = {p["name"]: p["containerPort"] for p in consumer["ports"]}
    assert ports == {"metrics": settings.feature_cache.metrics_port}
    assert settings.telemetry.metrics_host == "0.0.0.0"
    monitor = one(objects, "PodMonitor", "feature-cache")
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    pod_labels = one(objects, "Deployment", "feature-cache")["spec"]["template"]["metadata"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels["labels"].items()
    topics = render_topics()
    topic = one(topics, "KafkaTopic", settings.kafka.topic)
    assert one(topics, "KafkaTopic", settings.kafka.dead_letter_topic)
    workload = one(objects, "Deployment", "feature-cache")
    assert 1 <= workload["spec"]["replicas"] <= topic["spec"]["partitions"]
    # Strimzi reconciles topics in its Kafka cluster's namespace, the bootstrap's.
    cluster, namespace = settings.kafka.bootstrap_servers.split(":")[0].split(".")[:2]
    assert {t["metadata"]["namespace"] for t in topics} == {namespace}
    assert cluster == topic["metadata"]["labels"]["strimzi.io/cluster"] + "-kafka-bootstrap"
    assert not find(objects, "KafkaTopic"), "not in the decision service's namespace"


def test_the_probes_ask_the_servers_health_service(rendered: dict[str, list[Object]]) -> None:
    plain = container(rendered["dev"], "decision", "decision-server")
    assert plain["readinessProbe"]["grpc"] == {"port": 50051, "service": DECISION_SERVICE}
    assert plain["livenessProbe"]["grpc"] == {"port": 50051}
    # With TLS the kubelet's plaintext gRPC probe cannot connect: decision-probe checks
    # the same services with the CA of the mounted certificate.
    tls = container(rendered["prod"], "decision", "decision-server")
    mount = {m["name"]: m["mountPath"] for m in tls["volumeMounts"]}["tls"]
    readiness = tls["readinessProbe"]["exec"]["command"]
    assert "grpc" not in tls["readinessProbe"]
    assert readiness[0] == "decision-probe" and readiness[-1] == "127.0.0.1:50051"
    assert readiness[readiness.index("--service") + 1] == DECISION_SERVICE
    assert readiness[readiness.index("--ca-file") + 1].startswith(mount + "/")
    env = {e["name"]: e.get("value") for e in tls["env"]}
    assert env["DECISION_SERVER__TLS_CERT_FILE"].startswith(mount + "/")
    assert env["DECISION_SERVER__TLS_KEY_FILE"].startswith(mount + "/")


def test_grace_periods_cover_the_server_shutdown(objects: list[Object]) -> None:
    env = config_env(objects)
    spec = pod_spec(one(objects, "Deployment", "decision"))
    server = container(objects, "decision", "decision-server")
    pre_stop_s = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    shutdown_s = (
        pre_stop_s
        + float(env["DECISION_SERVER__GRACE_PERIOD_S"])
        + float(env["DECISION_AUDIT__SHUTDOWN_DRAIN_S"])
    )
    assert spec["terminationGracePeriodSeconds"] >= shutdown_s + 5
    for workload in ("model-secondary", "model-challenger"):
        spec = pod_spec(one(objects, "Deployment", workload))
        (torchserve,) = spec["containers"]
        assert (
            spec["terminationGracePeriodSeconds"]
            > (torchserve["lifecycle"]["preStop"]["sleep"]["seconds"])
        )


def test_disruption_budgets_and_autoscaling_cover_the_workloads(objects: list[Object]) -> None:
    for workload in WORKLOADS:
        labels = one(objects, "Deployment", workload)["spec"]["template"]["metadata"]["labels"]
        matching = [
            b
            for b in find(objects, "PodDisruptionBudget")
            if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(matching) == 1, workload
    hpa = one(objects, "HorizontalPodAutoscaler", "decision")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "decision"
    assert "replicas" not in one(objects, "Deployment", "decision")["spec"], "the HPA owns it"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_no_admin_token_is_in_the_repository(objects: list[Object]) -> None:
    secrets = [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"]
    assert not [name for name in secrets if name.startswith("decision-admin-tokens")]
    for secret in (o for o in objects if o["kind"] == "Secret"):
        for value in secret.get("data", {}).values():
            assert " operator " not in base64.b64decode(value).decode()


def test_prod_images_are_pinned_by_digest(rendered: dict[str, list[Object]]) -> None:
    for workload in WORKLOADS:
        for c in containers(one(rendered["prod"], "Deployment", workload)):
            assert "@sha256:" in c["image"], c["image"]
    assert not [o for o in rendered["prod"] if o["kind"] == "Secret"], "prod brings no Secret"


def test_prod_admits_only_images_the_release_workflow_signed_from_a_tag(
    rendered: dict[str, list[Object]],
) -> None:
    """Every image prod runs (init containers too) is under the policy's globs, and the
    policy's one authority is the release workflow's keyless identity on a version tag,
    with the SBOM attested (the workflow's cosign sign and attest)."""
    (policy,) = find(rendered["prod"], "ClusterImagePolicy")
    globs = [image["glob"] for image in policy["spec"]["images"]]
    images = {
        c["image"]
        for workload in find(rendered["prod"], "Deployment")
        for c in [*pod_spec(workload).get("initContainers", []), *pod_spec(workload)["containers"]]
    }
    for image in images:
        repository = image.split("@")[0]
        assert any(fnmatch.fnmatch(repository, glob.replace("**", "*")) for glob in globs), image
    (authority,) = policy["spec"]["authorities"]
    (identity,) = authority["keyless"]["identities"]
    assert identity["issuer"] == "https://token.actions.githubusercontent.com"
    subject = re.compile(identity["subjectRegExp"])
    workflow = "https://github.com/decision-service/decision-service/.github/workflows/release.yml"
    assert subject.fullmatch(f"{workflow}@refs/tags/v1.2.3")
    assert not subject.fullmatch(f"{workflow}@refs/heads/main")
    assert not subject.fullmatch(workflow.replace("release.yml", "ci.yml") + "@refs/tags/v1.2.3")
    assert [a["predicateType"] for a in authority["attestations"]] == ["https://cyclonedx.org/bom"]
    assert policy["spec"]["mode"] == "enforce" and "namespace" not in policy["metadata"]


def test_with_tls_no_service_port_claims_cleartext(rendered: dict[str, list[Object]]) -> None:
    for name in ("decision", "decision-headless", "decision-admin"):
        for port in one(rendered["prod"], "Service", name)["spec"]["ports"]:
            assert port.get("appProtocol") != "kubernetes.io/h2c", name
        assert one(rendered["dev"], "Service", name)["spec"]["ports"][0]["appProtocol"] == (
            "kubernetes.io/h2c"
        )


def quantity_bytes(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return float(text[:-2]) * units[text[-2:]] if text[-2:] in units else float(text)


def test_the_journal_fills_its_cap_before_its_volume_and_the_pod_its_limits(
    objects: list[Object],
) -> None:
    env = config_env(objects)
    spec = pod_spec(one(objects, "Deployment", "decision"))
    volumes = {
        v["name"]: quantity_bytes(v["emptyDir"]["sizeLimit"])
        for v in spec["volumes"]
        if "emptyDir" in v
    }
    segment_bytes = SEGMENT_MAX_BYTES  # each worker's open segment
    workers = int(env["DECISION_SERVER__WORKERS"])
    cap = int(env["DECISION_AUDIT__MAX_BACKLOG_BYTES"])
    assert cap > 0
    assert workers * (cap + segment_bytes) < volumes["journal"]
    # The pod is evicted when its volumes (and logs) pass the sum of the containers'
    # limits: the volumes alone must fit well inside it.
    limits = sum(
        quantity_bytes(c["resources"]["limits"]["ephemeral-storage"])
        for c in containers(one(objects, "Deployment", "decision"))
    )
    assert sum(volumes.values()) < limits - 2**29


def test_service_monitors_scrape_ports_that_serve_metrics(objects: list[Object]) -> None:
    workers = int(config_env(objects)["DECISION_SERVER__WORKERS"])
    metrics_port = int(config_env(objects)["DECISION_SERVER__METRICS_PORT"])
    serving = {f"metrics-{i}": metrics_port + i for i in range(workers)}
    serving["ts-metrics"] = CONTAINER_PORTS.rest_metrics
    for monitor in find(objects, "ServiceMonitor"):
        wanted = monitor["spec"]["selector"]["matchLabels"]
        services = [
            s
            for s in find(objects, "Service")
            if wanted.items() <= s["metadata"].get("labels", {}).items()
        ]
        assert services, monitor["metadata"]["name"]
        for service in services:
            ports_by_name = {p["name"]: p for p in service["spec"]["ports"]}
            for endpoint in monitor["spec"]["endpoints"]:
                port = ports_by_name[endpoint["port"]]
                assert port["port"] == serving[endpoint["port"]], (service, endpoint)
    decision = one(objects, "ServiceMonitor", "decision")
    assert sorted(e["port"] for e in decision["spec"]["endpoints"]) == sorted(serving)


def test_a_standard_monitoring_stack_selects_every_monitoring_object(objects: list[Object]) -> None:
    """kube-prometheus-stack's Prometheus picks rules and monitors by the release label, and
    links each alert's runbook_url as it is: every overlay's objects carry the label, and
    every runbook_url is an absolute address (k8s/base/monitoring-settings.yaml)."""
    release = load("base/monitoring-settings.yaml")[0]["data"]["release"]
    monitoring = [
        o for o in objects if o["kind"] in ("PrometheusRule", "ServiceMonitor", "PodMonitor")
    ]
    assert {o["kind"] for o in monitoring} == {"PrometheusRule", "ServiceMonitor", "PodMonitor"}
    for found in monitoring:
        assert found["metadata"]["labels"].get("release") == release, found["metadata"]["name"]
    urls = [
        rule["annotations"]["runbook_url"]
        for rules in find(objects, "PrometheusRule")
        for group in rules["spec"]["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    assert urls
    for url in urls:
        parsed = urllib.parse.urlparse(url)
        assert parsed.scheme == "https" and parsed.netloc and parsed.fragment, url


def test_the_labeler_environment_is_its_settings(
    objects: list[Object], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = container_env(objects, "labeler", "labeler")
    settings: QualitySettings = settings_from(QualitySettings, env, monkeypatch)
    labeler = container(objects, "labeler", "labeler")
    ports = {p["name"]: p["containerPort"] for p in labeler["ports"]}
    assert ports == {"metrics": settings.quality.metrics_port}
    assert settings.telemetry.metrics_host == "0.0.0.0"
    # The audit store and Redis of the decision pods, from the same Secrets.
    server = {e["name"]: e for e in container(objects, "decision", "decision-server")["env"]}
    own = {e["name"]: e for e in labeler["env"]}
    for name in ("DECISION_AUDIT__DATABASE_URL", "DECISION_REDIS__URL"):
        assert own[name]["valueFrom"] == server[name]["valueFrom"], name
    monitor = one(objects, "PodMonitor", "labeler")
    pod_labels = one(objects, "Deployment", "labeler")["spec"]["template"]["metadata"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels["labels"].items()
    assert one(objects, "Deployment", "labeler")["spec"]["replicas"] == 1


def test_the_archive_job_writes_to_its_volume_once_at_a_time_with_the_servers_settings(
    objects: list[Object], monkeypatch: pytest.MonkeyPatch
) -> None:
    cron = one(objects, "CronJob", "audit-archive")
    spec = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (archive,) = spec["containers"]
    env = {**config_env(objects)}
    for entry in archive["env"]:
        env[entry["name"]] = entry.get("value", "postgresql+psycopg://decision@pg.example/db")
    settings: Settings = settings_from(Settings, env, monkeypatch)
    mounts = {m["mountPath"]: m["name"] for m in archive["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = volumes[mounts[settings.audit.archive_url]]["persistentVolumeClaim"]["claimName"]
    assert one(objects, "PersistentVolumeClaim", claim)
    server = {e["name"]: e for e in container(objects, "decision", "decision-server")["env"]}
    own = {e["name"]: e for e in archive["env"]}
    assert (
        own["DECISION_AUDIT__DATABASE_URL"]["valueFrom"]
        == (server["DECISION_AUDIT__DATABASE_URL"]["valueFrom"])
    )
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    context = archive["securityContext"]
    assert context["readOnlyRootFilesystem"] and spec["securityContext"]["runAsNonRoot"]

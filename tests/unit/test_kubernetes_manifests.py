"""deploy/kubernetes: every overlay renders, is valid Kubernetes, and agrees with the code.

The overlays are rendered by `kubectl kustomize` (Debian's kubectl is enough: the files keep to
what kustomize 2.0.3 reads) and every object is validated against the Kubernetes 1.30 schemas
by kubernetes-validate in strict mode (an unknown field is an error). The rest checks the
manifests against the code: settings, ports, probe paths, images, the nginx configuration, the
autoscaling metric, security settings and the termination grace periods.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cluster import kubernetes as k8s
from cluster.settings import REPO_ROOT
from gateway import routes_health
from gateway.settings import GatewaySettings
from worker.metrics import WorkerMetrics
from worker.settings import WorkerSettings

DEPLOY = REPO_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.30.0"
WORKER_IMAGES = {"cpu": "tts-worker-cpu", "gpu": "tts-worker-cuda"}
PROJECT_VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
Objects = dict[tuple[str, str], dict[str, Any]]


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed (.ci/run installs Debian's kubernetes-client)")
    return found


def render(overlay: str) -> Objects:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}
    assert len(objects) == len(docs), "two objects of one kind share a name"
    return objects


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, Objects]:
    name: str = request.param
    return name, render(name)


def _get(objects: Objects, kind: str, prefix: str) -> dict[str, Any]:
    """The object of `kind` named `prefix`, or `prefix-<hash>` (generated ConfigMaps)."""
    found = [
        doc for (k, name), doc in objects.items()
        if k == kind and (name == prefix or re.fullmatch(rf"{prefix}-[a-z0-9]{{10}}", name))
    ]
    assert len(found) == 1, (kind, prefix, sorted(objects))
    return found[0]


def _containers(objects: Objects) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for (kind, name), doc in objects.items():
        if kind in ("Deployment", "StatefulSet"):
            pod = doc["spec"]["template"]["spec"]
            for container in pod["containers"]:
                yield name, pod, container


def _container(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = _get(objects, kind, name)["spec"]["template"]["spec"][
        "containers"
    ]
    assert len(containers) == 1
    return containers[0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def test_every_object_is_valid_kubernetes(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    for doc in objects.values():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_a_misspelt_field() -> None:
    broken = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"selektor": {"a": "b"}, "ports": [{"port": 80}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_everything_the_issue_lists_is_there(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    for kind, name in [
        ("Namespace", "tts"),
        ("StatefulSet", "redis"),
        ("Service", "redis"),
        ("Deployment", "gateway"),
        ("Service", "gateway"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("PodDisruptionBudget", "gateway"),
        ("Deployment", "worker"),
        ("Service", "worker"),
        ("HorizontalPodAutoscaler", "worker"),
        ("Deployment", "nginx"),
        ("Service", "nginx"),
        ("Service", "nginx-internal"),
        ("ConfigMap", "nginx-config"),
        ("NetworkPolicy", "default-deny-ingress"),
    ]:
        _get(objects, kind, name)
    assert _get(objects, "Service", "worker")["spec"]["clusterIP"] == "None"
    for (kind, _name), doc in objects.items():
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == k8s.NAMESPACE


def test_nginx_files_are_rendered_from_the_template() -> None:
    for name, content in k8s.rendered_files().items():
        on_disk = (k8s.OUTPUT_DIR / name).read_text()
        assert on_disk == content, (
            f"deploy/kubernetes/base/nginx/{name} is older than nginx/cluster.conf.template: "
            "run `make kubernetes-nginx` (python -m cluster.kubernetes --write)"
        )


def test_nginx_configmap_is_the_rendered_configuration(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    configmap = _get(objects, "ConfigMap", "nginx-config")
    assert configmap["data"] == k8s.rendered_files()
    nginx = _get(objects, "Deployment", "nginx")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in nginx["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    container = nginx["containers"][0]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts["config"] == k8s.CONFIG_DIR
    assert container["command"] == ["nginx", "-e", "stderr", "-c", f"{k8s.CONFIG_DIR}/nginx.conf"]
    cluster_conf = configmap["data"]["cluster.conf"]
    for service in ("gateway", "worker"):
        assert f"server {service}.{k8s.NAMESPACE}.svc.cluster.local:8000 resolve" in cluster_conf
    # `resolve` in open-source nginx needs 1.27.3 or newer.
    version = re.search(r":(\d+)\.(\d+)", container["image"])
    assert version is not None
    assert (int(version[1]), int(version[2])) >= (1, 28)


def test_environment_variables_are_settings_fields(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    fields = {
        "GATEWAY_": {f"GATEWAY_{name.upper()}" for name in GatewaySettings.model_fields},
        "WORKER_": {f"WORKER_{name.upper()}" for name in WorkerSettings.model_fields},
    }
    seen = 0
    for name, _pod, container in _containers(objects):
        for variable in _env(container) if "env" in container else {}:
            for prefix, known in fields.items():
                if variable.startswith(prefix):
                    assert variable in known, (name, variable)
                    seen += 1
    assert seen >= 10
    gateway = _env(_container(objects, "Deployment", "gateway"))
    worker = _env(_container(objects, "Deployment", "worker"))
    assert {"GATEWAY_HOST", "GATEWAY_PORT", "GATEWAY_REDIS_URL", "GATEWAY_WORKER_URL"} <= set(
        gateway
    )
    assert {"WORKER_HOST", "WORKER_PORT", "WORKER_ENGINE"} <= set(worker)
    assert gateway["GATEWAY_API_KEYS"]["secretKeyRef"]["name"] == "gateway-api-keys"


def _service_port(objects: Objects, name: str) -> tuple[int, str]:
    (port,) = _get(objects, "Service", name)["spec"]["ports"]
    return int(port["port"]), str(port["targetPort"])


def _named_port(container: dict[str, Any], name: str) -> int:
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == name))


def test_ports_and_urls_meet_the_services(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    gateway = _container(objects, "Deployment", "gateway")
    worker = _container(objects, "Deployment", "worker")
    nginx = _container(objects, "Deployment", "nginx")
    redis = _container(objects, "StatefulSet", "redis")
    assert _named_port(gateway, "http") == int(_env(gateway)["GATEWAY_PORT"]) == k8s.SERVICE_PORT
    assert _named_port(worker, "http") == int(_env(worker)["WORKER_PORT"]) == k8s.SERVICE_PORT
    assert _named_port(nginx, "public") == k8s.PUBLIC_PORT
    assert _named_port(nginx, "internal") == k8s.INTERNAL_PORT
    for service, container in [("gateway", gateway), ("worker", worker)]:
        port, target = _service_port(objects, service)
        assert port == k8s.SERVICE_PORT
        assert _named_port(container, target) == k8s.SERVICE_PORT
    port, target = _service_port(objects, "nginx-internal")
    assert f"http://nginx-internal:{port}" == _env(gateway)["GATEWAY_WORKER_URL"]
    assert _named_port(nginx, target) == k8s.INTERNAL_PORT
    port, target = _service_port(objects, "redis")
    assert _env(gateway)["GATEWAY_REDIS_URL"].startswith(f"redis://redis:{port}/")
    assert _named_port(redis, target) == port
    assert str(port) in redis["args"]


def _probe_paths(container: dict[str, Any]) -> dict[str, str]:
    return {
        kind: container[kind]["httpGet"]["path"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        if kind in container
    }


def test_probes_use_the_paths_the_services_serve(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    gateway_paths = {route.path for route in routes_health.ROUTES}
    worker_source = (REPO_ROOT / "worker" / "app.py").read_text()
    gateway = _probe_paths(_container(objects, "Deployment", "gateway"))
    assert gateway == {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    assert set(gateway.values()) <= gateway_paths
    worker = _probe_paths(_container(objects, "Deployment", "worker"))
    assert worker == {"startupProbe": "/readyz", "readinessProbe": "/readyz",
                      "livenessProbe": "/livez"}
    for path in worker.values():
        assert f'@app.get("{path}")' in worker_source
    nginx = _probe_paths(_container(objects, "Deployment", "nginx"))
    assert set(nginx.values()) == {"/nginx_status"}
    assert "location = /nginx_status" in k8s.rendered_files()["cluster.conf"]


def _compose_images() -> dict[str, str]:
    """Image name -> the Dockerfile that builds it, as docker-compose.yml says."""
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    return {
        service["image"]: service["build"]["dockerfile"]
        for service in compose["services"].values()
        if "build" in service
    }


def test_images_are_those_the_dockerfiles_build(overlay: tuple[str, Objects]) -> None:
    name, objects = overlay
    built = _compose_images()
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())

    def image_name(kind: str, obj: str) -> str:
        image, _, tag = str(_container(objects, kind, obj)["image"]).partition(":")
        if image.startswith("tts-"):
            # The project's images carry its version, never `latest`.
            assert tag == PROJECT_VERSION, (image, tag)
        return image

    assert image_name("Deployment", "gateway") == "tts-gateway"
    assert built["tts-gateway"] == "docker/gateway.Dockerfile"
    worker_image = image_name("Deployment", "worker")
    assert worker_image == WORKER_IMAGES[name]
    assert (REPO_ROOT / built[worker_image]).is_file()
    dockerfile = (REPO_ROOT / built[worker_image]).read_text()
    engine = _env(_container(objects, "Deployment", "worker"))["WORKER_ENGINE"]
    assert f"WORKER_ENGINE={engine}" in dockerfile
    # The images' user is the one the pods run as.
    for image in ("tts-gateway", worker_image):
        assert "useradd --system --uid 10001" in (REPO_ROOT / built[image]).read_text()
    assert _container(objects, "StatefulSet", "redis")["image"] == compose["services"]["redis"][
        "image"
    ]


def test_every_container_is_locked_down_and_bounded(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    for name, pod, container in _containers(objects):
        security = container["securityContext"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), (name, bound)


def _seconds(value: str) -> float:
    return float(value)


def _pre_stop_pause(container: dict[str, Any]) -> float:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    if command[0] == "sleep":
        return float(command[1])
    match = re.match(r"sleep (\d+);", command[-1])
    assert match is not None, command
    return float(match[1])


@pytest.mark.parametrize("service", ["gateway", "worker"])
def test_grace_period_outlasts_the_longest_stream(
    overlay: tuple[str, Objects], service: str
) -> None:
    _, objects = overlay
    prefix = service.upper() + "_"
    pod = _get(objects, "Deployment", service)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = _env(container)
    deadline = _seconds(env[f"{prefix}REQUEST_DEADLINE_S"])
    grace = _seconds(env[f"{prefix}SHUTDOWN_GRACE_S"])
    assert grace >= deadline
    assert pod["terminationGracePeriodSeconds"] > _pre_stop_pause(container) + grace
    nginx_pod = _get(objects, "Deployment", "nginx")["spec"]["template"]["spec"]
    nginx_pause = _pre_stop_pause(nginx_pod["containers"][0])
    assert nginx_pod["terminationGracePeriodSeconds"] > nginx_pause + deadline


def test_redis_persists_and_evicts_only_cache_entries(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    statefulset = _get(objects, "StatefulSet", "redis")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(container["args"])
    assert "--appendonly yes" in args
    assert "--maxmemory-policy volatile-lru" in args
    maxmemory = re.search(r"--maxmemory (\d+)gb", args)
    limit = re.fullmatch(r"(\d+)Gi", container["resources"]["limits"]["memory"])
    assert maxmemory is not None
    assert limit is not None
    assert int(maxmemory[1]) < int(limit[1])
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data"


def _ingress_sources(objects: Objects, name: str) -> dict[int, set[str]]:
    """Port -> names of the pods (or `*`, `monitoring`) a NetworkPolicy lets in."""
    policy = _get(objects, "NetworkPolicy", name)["spec"]
    allowed: dict[int, set[str]] = {}
    for rule in policy["ingress"]:
        sources = set()
        for peer in rule.get("from", [{"any": True}]):
            if "podSelector" in peer:
                sources.add(peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"])
            elif "namespaceSelector" in peer:
                sources.add(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
            else:
                sources.add("*")
        for port in rule["ports"]:
            allowed.setdefault(int(port["port"]), set()).update(sources)
    return allowed


def test_network_policies_admit_only_the_callers(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    deny = _get(objects, "NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny["podSelector"] == {}
    assert deny["policyTypes"] == ["Ingress"]
    assert "ingress" not in deny
    assert _ingress_sources(objects, "nginx") == {8080: {"*"}, 8081: {"gateway"}}
    assert _ingress_sources(objects, "gateway") == {8000: {"nginx", "monitoring"}}
    assert _ingress_sources(objects, "worker") == {8000: {"nginx", "monitoring"}}
    assert _ingress_sources(objects, "redis") == {6379: {"gateway"}}


def test_workers_scale_on_their_own_load(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    hpa = _get(objects, "HorizontalPodAutoscaler", "worker")["spec"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "worker_load"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "750m"}
    adapter = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == "worker_load"
    exported = {family.name for family in WorkerMetrics().registry.collect()}
    used = set(re.findall(r"\b(worker_[a-z_]+)\{", rule["metricsQuery"] + rule["seriesQuery"]))
    assert used == {"worker_active_streams", "worker_queued_requests", "worker_max_concurrency"}
    assert used <= exported
    gateway_hpa = _get(objects, "HorizontalPodAutoscaler", "gateway")["spec"]
    assert gateway_hpa["metrics"][0]["resource"]["name"] == "cpu"


def test_gpu_workers_get_one_gpu_and_the_model_volume() -> None:
    objects = render("gpu")
    pod = _get(objects, "Deployment", "worker")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = _env(container)
    assert env["WORKER_ENGINE"] == "cosyvoice"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    assert mounts["model"]["mountPath"] == env["WORKER_MODEL_DIR"]
    assert mounts["model"]["readOnly"] is True
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    claim = volumes["model"]["persistentVolumeClaim"]["claimName"]
    assert _get(objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadOnlyMany"]
    # Loading and warm-up may take minutes: the startup probe allows ten.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_cpu_workers_need_no_gpu() -> None:
    objects = render("cpu")
    pod = _get(objects, "Deployment", "worker")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert _env(container)["WORKER_ENGINE"] == "piper"
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "nodeSelector" not in pod
    threads = int(_env(container)["WORKER_THREADS"])
    assert threads == int(container["resources"]["limits"]["cpu"])


def test_every_scanner_exception_is_justified_in_the_docs(overlay: tuple[str, Objects]) -> None:
    """Each checkov check skipped on a resource is listed, with its reason, in the docs."""
    _, objects = overlay
    docs = (REPO_ROOT / "docs" / "kubernetes.md").read_text()
    skipped = {
        value.split("=", 1)[0]
        for doc in objects.values()
        for name, value in doc["metadata"].get("annotations", {}).items()
        if name.startswith("checkov.io/skip")
    }
    assert skipped
    for check in skipped:
        assert re.search(rf"`{check}`[^\n]*\S", docs), f"{check} is not justified in docs"

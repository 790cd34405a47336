"""Static checks of the Kubernetes manifests (docker/k8s/): schemas and cross-references.
No cluster needed. Workers, scaling and Redis: test_k8s_workers.py.

Core objects are validated by kubernetes-validate (the Kubernetes OpenAPI schemas it bundles,
strict: unknown fields are errors) for the oldest and newest Kubernetes it knows of the
range we support. KEDA's ScaledObject has no schema there: it is validated against
``SCALED_OBJECT_SCHEMA`` (tests/k8s_support.py), written from KEDA's ScaledObject reference.
What the exporter really emits is checked against a live exporter in
tests/integration/test_k8s_live.py.
"""

from __future__ import annotations

import re

import jsonschema
import kubernetes_validate
import pytest
import yaml
from k8s_support import (
    NAMESPACE,
    PROMETHEUS_TRIGGER_KEYS,
    PROMETHEUS_TRIGGER_REQUIRED,
    SCALED_OBJECT_SCHEMA,
    SECRET_EXAMPLE,
    Manifest,
    configmap_data,
    containers,
    manifest_files,
    manifests,
    of_kind,
    pod_spec,
    secret_data,
    workloads,
)

#: Kubernetes releases the manifests must validate on: the oldest still widely run, the newest.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
KEDA_KINDS = {"ScaledObject"}
EXPORTER_QUEUE_METRICS = {"pipeq_queue_depth", "pipeq_queue_oldest_age_seconds"}


def by_id(manifest: Manifest) -> str:
    return str(manifest)


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("manifest", [m for m in manifests() if m.kind not in KEDA_KINDS],
                         ids=by_id)
def test_core_objects_validate_against_the_kubernetes_schemas(manifest: Manifest) -> None:
    """KEDA's kinds: test_scaled_objects_follow_kedas_spec."""
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(manifest.obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{manifest} is invalid on Kubernetes {version}: {exc}")


def test_strict_validation_catches_a_misspelt_field() -> None:
    """The check above has teeth: an unknown field (a typo the API server would drop)."""
    deployment = dict(of_kind("Deployment")["pipeq-worker-l4"])
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_only_keda_kinds_lack_a_bundled_schema() -> None:
    unknown = set()
    for manifest in manifests():
        try:
            kubernetes_validate.validate(manifest.obj, K8S_VERSIONS[-1])
        except kubernetes_validate.SchemaNotFoundError:
            unknown.add(manifest.kind)
    assert unknown == KEDA_KINDS


@pytest.mark.parametrize("name", sorted(of_kind("ScaledObject")))
def test_scaled_objects_follow_kedas_spec(name: str) -> None:
    scaled = of_kind("ScaledObject")[name]
    jsonschema.validate(scaled, SCALED_OBJECT_SCHEMA)
    spec = scaled["spec"]
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus", trigger
        meta = trigger["metadata"]
        assert set(meta) >= PROMETHEUS_TRIGGER_REQUIRED, f"{name}: {sorted(meta)}"
        unknown = set(meta) - PROMETHEUS_TRIGGER_KEYS
        assert not unknown, f"{name}: unknown prometheus trigger metadata {unknown}"
        float(meta["threshold"]), float(meta.get("activationThreshold", "0"))
        # No series must be an error (-> fallback), never "0 jobs" (-> scale to nothing).
        assert meta["ignoreNullValues"] == "false", name


def test_keda_schema_catches_a_misspelt_field() -> None:
    scaled = of_kind("ScaledObject")["pipeq-worker-a100"]
    broken = {**scaled, "spec": {**scaled["spec"], "minReplicas": 0}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCALED_OBJECT_SCHEMA)


# --------------------------------------------------------------------------- layout


def test_every_object_lives_in_the_pipeq_namespace_created_first() -> None:
    first = yaml.safe_load(manifest_files()[0].read_text())
    assert (first["kind"], first["metadata"]["name"]) == ("Namespace", NAMESPACE)
    for manifest in manifests():
        if manifest.kind != "Namespace":
            assert manifest.obj["metadata"].get("namespace") == NAMESPACE, str(manifest)


def test_names_are_unique_per_kind() -> None:
    seen = [(m.kind, m.name) for m in manifests()]
    assert len(seen) == len(set(seen)), sorted(seen)


def test_no_password_is_applied_by_default() -> None:
    """The Secret with placeholder passwords is an example kubectl does not apply; every
    secret a container gets comes from that Secret, never from a literal or a ConfigMap."""
    applied = [m for m in manifests(with_secret=False) if m.kind == "Secret"]
    assert not applied
    assert not SECRET_EXAMPLE.name.endswith((".yaml", ".yml", ".json"))
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEYS|AUTH", re.IGNORECASE)
    for name, workload in workloads().items():
        for container in containers(workload):
            for var in container.get("env", []):
                if secretish.search(var["name"]):
                    assert "secretKeyRef" in var.get("valueFrom", {}), f"{name}: {var}"
    for name, configmap in of_kind("ConfigMap").items():
        leaked = [key for key in configmap["data"] if secretish.search(key)]
        assert not leaked, f"ConfigMap {name} holds {leaked}"
    for path in manifest_files():
        assert not re.search(r"://[^/@\s]*:[^@/\s]+@", path.read_text()), \
            f"{path}: a password in a URL"


# --------------------------------------------------------------------------- references


def test_service_selectors_match_pod_labels_and_ports() -> None:
    pods = {name: w["spec"]["template"] for name, w in workloads().items()}
    for name, service in of_kind("Service").items():
        selector = service["spec"]["selector"]
        matching = [p for p in pods.values()
                    if selector.items() <= p["metadata"]["labels"].items()]
        assert matching, f"Service {name} selects no pod: {selector}"
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            names = {p.get("name") for t in matching for c in t["spec"]["containers"]
                     for p in c.get("ports", [])}
            assert target in names, f"Service {name}: no container port named {target}"


def test_workload_selectors_match_their_own_pods() -> None:
    for name, workload in workloads().items():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
    for name, pdb in of_kind("PodDisruptionBudget").items():
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
                   for w in workloads().values()), f"PDB {name} selects nothing"


def test_configmaps_and_secret_keys_referenced_exist() -> None:
    configmaps, secret = of_kind("ConfigMap"), secret_data()
    for name, workload in workloads().items():
        for volume in pod_spec(workload).get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, f"{name}: {volume}"
        for container in containers(workload):
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps, name
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "pipeq-secrets", f"{name}: {ref}"
                    assert ref["key"] in secret, f"{name}: secret key {ref['key']} missing"
            mounts = {v["name"] for v in pod_spec(workload).get("volumes", [])}
            claims = {t["metadata"]["name"]
                      for t in workload["spec"].get("volumeClaimTemplates", [])}
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in mounts | claims, f"{name}: {mount}"


def test_scripts_and_files_the_containers_run_exist() -> None:
    """Every /etc/... path in a command names a key of the ConfigMap mounted there."""
    for name, workload in workloads().items():
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        for container in containers(workload):
            mounted = {m["mountPath"]: volumes[m["name"]]["configMap"]["name"]
                       for m in container.get("volumeMounts", [])
                       if "configMap" in volumes.get(m["name"], {})}
            words = list(container.get("command", []))
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                words += container.get(probe, {}).get("exec", {}).get("command", [])
            for word in words:
                for mount, configmap in mounted.items():
                    if str(word).startswith(mount + "/"):
                        key = str(word)[len(mount) + 1:]
                        assert key in configmap_data(configmap), f"{name}: {word}"

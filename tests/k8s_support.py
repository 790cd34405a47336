"""Helpers of the Kubernetes manifest tests (docker/k8s/): loading the objects, resolving a
container's environment as the kubelet would, KEDA's ScaledObject shape, and a small PromQL
evaluator for the aggregations KEDA's queries use (parsed by promql-parser, Prometheus'
grammar), so a query can be run on what the real exporter served."""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "docker" / "k8s"
#: Not applied by `kubectl apply -f docker/k8s/` (a Secret with known passwords must never
#: reach a cluster by default); read by the tests as the Secret's shape.
SECRET_EXAMPLE = K8S_DIR / "secrets.yaml.example"
NAMESPACE = "pipeq"
#: Placeholder values the tests give the Secret's keys when they build a pod's environment.
SECRET_VALUES = {"redis-password": "0123abcd", "sentinel-password": "4567ef01",
                 "flower-user": "ops", "flower-password": "pw",
                 "gateway-api-keys": "webapp:0123456789abcdef0123456789abcdef", "hf-token": ""}
_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

Sample = tuple[str, dict[str, str], float]


@dataclass(frozen=True)
class Manifest:
    """One object of a manifest file."""

    path: Path
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    def __str__(self) -> str:
        return f"{self.path.name}: {self.kind}/{self.name}"


def manifest_files() -> list[Path]:
    """What `kubectl apply -f docker/k8s/` applies, in its order (file names sort)."""
    return sorted(K8S_DIR.glob("*.yaml"))


@functools.cache
def manifests(with_secret: bool = True) -> tuple[Manifest, ...]:
    """Every object of the folder (and of the Secret's example)."""
    files = manifest_files() + ([SECRET_EXAMPLE] if with_secret else [])
    found = []
    for path in files:
        for obj in yaml.safe_load_all(path.read_text()):
            if obj is not None:
                found.append(Manifest(path, obj))
    return tuple(found)


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    """Objects of one kind, by name."""
    return {m.name: m.obj for m in manifests() if m.kind == kind}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def workloads() -> dict[str, dict[str, Any]]:
    """Deployments and StatefulSets, by name."""
    return {**of_kind("Deployment"), **of_kind("StatefulSet")}


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def pipeq_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    """(deployment name, container) of every container that runs pipeq itself."""
    for name, deployment in of_kind("Deployment").items():
        for container in containers(deployment):
            if str(container["image"]).startswith("pipeq"):
                yield name, container


def worker_deployments() -> dict[str, dict[str, Any]]:
    return {name: d for name, d in of_kind("Deployment").items()
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"}


def secret_data() -> dict[str, str]:
    secret = of_kind("Secret")["pipeq-secrets"]
    return dict(secret.get("stringData") or {})


def configmap_data(name: str) -> dict[str, str]:
    return dict(of_kind("ConfigMap")[name]["data"])


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps first, then
    ``env`` in order, each ``$(NAME)`` replaced by an earlier variable's value."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmap_data(source["configMapRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = _REF.sub(lambda m: env.get(m[1], m[0]), str(var["value"]))
            continue
        ref = var["valueFrom"]
        if "secretKeyRef" in ref:
            env[var["name"]] = SECRET_VALUES[ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            env[var["name"]] = configmap_data(key["name"])[key["key"]]
    return env


def container_args(container: dict[str, Any]) -> list[str]:
    """The container's args with ``$(NAME)`` replaced from its environment."""
    env = container_env(container)
    return [_REF.sub(lambda m: env.get(m[1], m[0]), str(a)) for a in container.get("args", [])]


def routes_toml() -> str:
    return configmap_data("pipeq-routes")["routes.toml"]


def routes_table() -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = tomllib.loads(routes_toml())["route"]
    return routes


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None


# --------------------------------------------------------------------------- KEDA

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_HPA_POLICY = {"type": "object", "additionalProperties": False,
               "required": ["type", "value", "periodSeconds"],
               "properties": {"type": {"enum": ["Pods", "Percent"]},
                              "value": {"type": "integer", "minimum": 1},
                              "periodSeconds": {"type": "integer", "minimum": 1,
                                                "maximum": 1800}}}
_HPA_RULES = {"type": "object", "additionalProperties": False,
              "properties": {"stabilizationWindowSeconds": {"type": "integer", "minimum": 0,
                                                            "maximum": 3600},
                             "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
                             "policies": {"type": "array", "items": _HPA_POLICY}}}
#: KEDA v2's ScaledObject (keda.sh/v1alpha1) as its reference documents it (ScaledObject
#: specification, KEDA 2.12+), written out here: kubernetes-validate has no schema for custom
#: resources. Every level forbids unknown fields, so a typo fails as it would be ignored
#: (silently) by a cluster that prunes unknown fields.
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object", "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object", "additionalProperties": False, "required": ["name"],
                    "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                   "apiVersion": {"type": "string"},
                                   "envSourceContainerName": {"type": "string"}}},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object", "additionalProperties": False,
                    "required": ["failureThreshold", "replicas"],
                    "properties": {"failureThreshold": {"type": "integer", "minimum": 1},
                                   "replicas": {"type": "integer", "minimum": 0}}},
                "advanced": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object", "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {
                                    "type": "object", "additionalProperties": False,
                                    "properties": {"scaleUp": _HPA_RULES,
                                                   "scaleDown": _HPA_RULES}}}},
                        "scalingModifiers": {"type": "object"}}},
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"}, "name": {"type": "string"},
                            "metadata": _STR_MAP,
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                "type": "object", "required": ["name"],
                                "additionalProperties": False,
                                "properties": {"name": {"type": "string"},
                                               "kind": {"enum": [
                                                   "TriggerAuthentication",
                                                   "ClusterTriggerAuthentication"]}}}}}},
            },
        },
    },
}
#: KEDA's prometheus scaler: its metadata keys (all strings), and those it requires.
PROMETHEUS_TRIGGER_KEYS = {"serverAddress", "query", "threshold", "activationThreshold",
                           "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl",
                           "queryParameters", "authModes"}
PROMETHEUS_TRIGGER_REQUIRED = {"serverAddress", "query", "threshold"}


# --------------------------------------------------------------------------- PromQL


def selectors(expr: Any) -> Iterator[Any]:
    """Every vector selector of a parsed PromQL expression."""
    import promql_parser as pq

    if isinstance(expr, pq.VectorSelector):
        yield expr
    elif isinstance(expr, pq.MatrixSelector):
        yield from selectors(expr.vector_selector)
    elif isinstance(expr, pq.BinaryExpr):
        yield from selectors(expr.lhs)
        yield from selectors(expr.rhs)
    elif isinstance(expr, pq.Call):
        for arg in expr.args:
            yield from selectors(arg)
    elif isinstance(expr, pq.AggregateExpr | pq.ParenExpr | pq.UnaryExpr | pq.SubqueryExpr):
        yield from selectors(expr.expr)


def grouping_labels(expr: Any) -> Iterator[str]:
    """Labels an expression groups or matches on (``by (...)``, ``on (...)``)."""
    import promql_parser as pq

    if isinstance(expr, pq.AggregateExpr):
        if expr.modifier is not None:
            yield from expr.modifier.labels
        yield from grouping_labels(expr.expr)
    elif isinstance(expr, pq.BinaryExpr):
        modifier = expr.modifier
        matching = getattr(modifier, "matching", None) if modifier is not None else None
        if matching is not None:
            yield from matching.labels
        yield from grouping_labels(expr.lhs)
        yield from grouping_labels(expr.rhs)
    elif isinstance(expr, pq.ParenExpr | pq.UnaryExpr | pq.SubqueryExpr):
        yield from grouping_labels(expr.expr)
    elif isinstance(expr, pq.Call):
        for arg in expr.args:
            yield from grouping_labels(arg)


def _matches(matcher: Any, labels: dict[str, str]) -> bool:
    import promql_parser as pq

    value = labels.get(matcher.name, "")
    op = matcher.op
    if op == pq.MatchOp.Equal:
        return value == matcher.value
    if op == pq.MatchOp.NotEqual:
        return value != matcher.value
    hit = re.fullmatch(matcher.value, value) is not None
    return hit if op == pq.MatchOp.Re else not hit


def evaluate(query: str, samples: list[Sample]) -> float | None:
    """Value of a KEDA query on scraped samples: an aggregation (sum, max, min) without
    grouping over one vector selector, as KEDA needs a single number. None: no series (what
    KEDA's ignoreNullValues=false turns into an error)."""
    import promql_parser as pq

    expr = pq.parse(query)
    assert isinstance(expr, pq.AggregateExpr), f"{query}: not an aggregation"
    assert expr.modifier is None, f"{query}: KEDA needs one number, not groups"
    inner = expr.expr
    assert isinstance(inner, pq.VectorSelector), f"{query}: aggregate one selector"
    values = [value for name, labels, value in samples
              if name == inner.name and all(_matches(m, labels) for m in inner.matchers.matchers)]
    if not values:
        return None
    aggregate = {"sum": sum, "max": max, "min": min}[str(expr.op)]
    return float(aggregate(values))

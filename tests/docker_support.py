"""Helpers of the Docker deployment tests: parsing compose.yaml, Dockerfiles, pyproject.toml
and settings/redis.conf (no Docker engine, no network)."""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
WORKER_DOCKERFILE = DOCKER_DIR / "worker.Dockerfile"
PRODUCER_DOCKERFILE = DOCKER_DIR / "producer.Dockerfile"
REDIS_CONF = ROOT / "settings" / "redis.conf"
PYPROJECT = ROOT / "pyproject.toml"

EXPECTED_WORKERS = ["worker-gpu0", "worker-gpu1"]
SECRET_KEY = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|AUTH", re.IGNORECASE)
# A whole value that is one required interpolation: ${NAME:?message} or ${NAME?message}.
REQUIRED_VAR = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*:?\?[^}]*\}$")
URL_PASSWORD = re.compile(r"://[^/@\s]*:([^@/\s]*)@")
each_dockerfile = pytest.mark.parametrize(
    "dockerfile", [WORKER_DOCKERFILE, PRODUCER_DOCKERFILE], ids=lambda p: p.name
)


# --------------------------------------------------------------------------- helpers


@functools.cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "compose.yaml must be a mapping"
    return data


def services() -> dict[str, dict[str, Any]]:
    svcs = compose()["services"]
    assert isinstance(svcs, dict)
    return svcs


def build_of(svc: dict[str, Any]) -> dict[str, Any] | None:
    build = svc.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        return {"context": build, "dockerfile": "Dockerfile"}
    return {"dockerfile": "Dockerfile", **build}


def dockerfile_of(svc: dict[str, Any]) -> Path | None:
    build = build_of(svc)
    if build is None:
        return None
    return (DOCKER_DIR / str(build["context"]) / str(build["dockerfile"])).resolve()


def worker_services() -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in services().items()
        if dockerfile_of(svc) == WORKER_DOCKERFILE.resolve()
    }


def gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    deploy = svc.get("deploy") or {}
    reservations = (deploy.get("resources") or {}).get("reservations") or {}
    return list(reservations.get("devices") or [])


def flag_value(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return str(argv[argv.index(flag) + 1])


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Yield (dotted path, scalar) for every leaf of a parsed YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")
    else:
        yield path, node


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


@functools.cache
def parse_dockerfile(path: Path) -> tuple[Stage, ...]:
    """Split a Dockerfile into stages of (INSTRUCTION, arguments), continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instr, _, args = line.partition(" ")
        instr, args = instr.upper(), args.strip()
        if instr == "FROM":
            parts = args.split()
            base = re.sub(
                r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), parts[0]
            )
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=base))
        elif not stages:
            if instr == "ARG":
                key, _, default = args.partition("=")
                global_args[key] = default.strip("\"'")
        else:
            stages[-1].instructions.append((instr, args))
    assert stages, f"{path.name}: no FROM"
    return tuple(stages)


def stage_chain(path: Path, stage_name: str | None = None) -> list[Stage]:
    """The stage (default: last) preceded by the stages it is built FROM, base first."""
    stages = {s.name: s for s in parse_dockerfile(path)}
    stage = stages[stage_name] if stage_name else parse_dockerfile(path)[-1]
    chain = [stage]
    while chain[0].base in stages:
        chain.insert(0, stages[chain[0].base])
    return chain


def instructions(chain: list[Stage], kind: str) -> list[str]:
    return [args for stage in chain for instr, args in stage.instructions if instr == kind]


@dataclass
class PipInstall:
    local_extras: list[set[str]]  # one entry per install of the local project ("." / ".[x]")
    packages: list[str]  # requirements named directly (not the local project)


def pip_installs(chain: list[Stage]) -> PipInstall:
    result = PipInstall(local_extras=[], packages=[])
    for run in instructions(chain, "RUN"):
        for match in re.finditer(r"\bpip3?\s+install\b([^&;|]*)", run):
            for token in match.group(1).split():
                token = token.strip("\"'")
                local = re.fullmatch(r"\.(?:\[([^\]]*)\])?", token)
                if local:
                    extras = local.group(1) or ""
                    result.local_extras.append({e.strip() for e in extras.split(",") if e.strip()})
                elif token and not token.startswith(("-", "$")):
                    result.packages.append(token)
    return result


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"unparsable requirement {requirement!r}"
    return normalize(match.group(1))


@functools.cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def extra_packages(extras: set[str] | frozenset[str]) -> set[str]:
    """Distribution names an install of `.[extras]` pulls in, self-references expanded."""
    project = pyproject()["project"]
    optional = project.get("optional-dependencies", {})
    own_name = normalize(project["name"])
    names: set[str] = set()
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in optional, f"extra {extra!r} is not defined in pyproject.toml"
        for req in optional[extra]:
            name = requirement_name(req)
            if name == own_name:
                todo.extend(re.findall(r"[\w-]+", req.split("[", 1)[1].split("]")[0]))
            else:
                names.add(name)
    return names


def is_root(user: str) -> bool:
    name = user.split(":", 1)[0].strip()
    return name in {"root", "0"}


def effective_user(chain: list[Stage]) -> str:
    users = instructions(chain, "USER")
    return users[-1] if users else "root"


def parse_redis_conf() -> dict[str, str]:
    directives: dict[str, str] = {}
    for raw in REDIS_CONF.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        directives[key.lower()] = value.strip()
    return directives

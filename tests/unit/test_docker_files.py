"""Static checks of the Docker deployment files: no Docker engine, no network.

Covers docker/compose.yaml, docker/*.Dockerfile and settings/redis.conf.
"""

from __future__ import annotations

import functools
import json
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
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


# --------------------------------------------------------------------------- compose


def test_compose_parses_with_expected_services() -> None:
    svcs = services()
    assert {"redis", "flower", "metrics", *EXPECTED_WORKERS} <= set(svcs)
    for name, svc in svcs.items():
        assert svc.get("image") or svc.get("build"), f"{name}: neither image nor build"
    assert compose().get("x-worker"), "worker settings should live in one x-worker extension"


def test_worker_services_reserve_distinct_nvidia_gpus() -> None:
    workers = worker_services()
    assert sorted(workers) == EXPECTED_WORKERS
    seen: dict[str, str] = {}
    for name, svc in workers.items():
        devices = gpu_devices(svc)
        assert len(devices) == 1, f"{name}: expected exactly one device reservation"
        device = devices[0]
        assert device.get("driver") == "nvidia", name
        assert "gpu" in device.get("capabilities", []), name
        assert "count" not in device, f"{name}: pin with device_ids, not count"
        ids = device.get("device_ids")
        assert isinstance(ids, list) and ids, f"{name}: device_ids must be a non-empty list"
        for gpu in ids:
            assert isinstance(gpu, str), f"{name}: quote device id {gpu!r}"
            assert gpu not in seen, f"GPU {gpu} reserved by both {seen.get(gpu)} and {name}"
            seen[gpu] = name


def test_workers_use_the_single_visible_gpu() -> None:
    for name, svc in worker_services().items():
        argv = [str(a) for a in svc["command"]]
        assert flag_value(argv, "--device") == "cuda:0", (
            f"{name}: a container sees only its reserved GPU, which is cuda:0"
        )
        assert flag_value(argv, "--task") and flag_value(argv, "--model")


def test_only_workers_reserve_gpus() -> None:
    workers = worker_services()
    for name, svc in services().items():
        if name not in workers:
            assert not gpu_devices(svc), f"{name} must not hold a GPU"


def test_every_service_has_a_healthcheck() -> None:
    for name, svc in services().items():
        check = svc.get("healthcheck")
        assert isinstance(check, dict), f"{name}: no healthcheck"
        assert not check.get("disable"), f"{name}: healthcheck disabled"
        test = check.get("test")
        if isinstance(test, list):
            assert test[0] in {"CMD", "CMD-SHELL"} and len(test) > 1, f"{name}: {test}"
        else:
            assert isinstance(test, str) and test.strip(), f"{name}: empty healthcheck"


def test_worker_healthcheck_checks_its_own_route() -> None:
    for name, svc in worker_services().items():
        argv = [str(a) for a in svc["command"]]
        test = [str(a) for a in svc["healthcheck"]["test"]]
        assert test[:3] == ["CMD", "pipeq", "status"], f"{name}: {test}"
        assert flag_value(test, "--route-task") == flag_value(argv, "--task"), name
        assert flag_value(test, "--route-model") == flag_value(argv, "--model"), name


def test_pipeq_services_wait_for_healthy_redis() -> None:
    for name, svc in services().items():
        if name == "redis":
            continue
        depends = svc.get("depends_on")
        assert isinstance(depends, dict), f"{name}: depends_on must use the long form"
        assert depends.get("redis", {}).get("condition") == "service_healthy", name


def test_workers_share_a_named_model_cache_volume() -> None:
    declared = compose().get("volumes") or {}
    for name, svc in worker_services().items():
        mounts = [str(v).split(":") for v in svc.get("volumes", [])]
        sources = [m[0] for m in mounts if len(m) >= 2 and m[1] == "/models"]
        assert sources, f"{name}: no volume at /models (HF_HOME)"
        assert sources[0] in declared, f"{name}: /models should be a named volume"


def test_monitor_services_use_the_monitor_extra_image() -> None:
    for name in ("flower", "metrics"):
        svc = services()[name]
        assert dockerfile_of(svc) == PRODUCER_DOCKERFILE.resolve(), name
        build = build_of(svc)
        assert build is not None, f"{name}: not built from the repo"
        chain = stage_chain(PRODUCER_DOCKERFILE, build.get("target"))
        extras = set().union(*pip_installs(chain).local_extras)
        assert "flower" in extra_packages(extras), f"{name}: image lacks flower"
        assert "prometheus-client" in extra_packages(extras), f"{name}: image lacks exporter"
    assert services()["flower"]["command"][0] == "flower"
    assert services()["metrics"]["command"][:3] == ["metrics", "--port", "9808"]


# --------------------------------------------------------------------------- redis


def redis_mount_target() -> str:
    redis = services()["redis"]
    for volume in redis.get("volumes", []):
        parts = str(volume).split(":")
        if (DOCKER_DIR / parts[0]).resolve() == REDIS_CONF.resolve():
            assert len(parts) == 3 and parts[2] == "ro", "mount redis.conf read-only"
            return parts[1]
    raise AssertionError("redis does not mount settings/redis.conf")


def test_redis_service_runs_the_repo_config() -> None:
    redis = services()["redis"]
    assert str(redis["image"]).startswith("redis:7"), redis["image"]
    command = [str(a) for a in redis["command"]]
    assert command[0] == "redis-server"
    assert command[1] == redis_mount_target(), "redis-server must load the mounted config"
    assert REQUIRED_VAR.match(flag_value(command, "--requirepass"))


def test_redis_conf_is_durable_and_never_evicts() -> None:
    conf = parse_redis_conf()
    assert conf.get("appendonly") == "yes"
    assert conf.get("appendfsync") == "everysec"
    assert conf.get("maxmemory-policy") == "noeviction"
    assert conf.get("protected-mode") == "yes"
    assert conf.get("timeout") == "0", "idle Celery connections must not be cut"
    assert conf.get("save") not in (None, '""', "''"), "RDB snapshots should stay on"
    assert "requirepass" not in conf, "the password comes from compose, not the file"
    assert "daemonize" not in conf or conf["daemonize"] == "no"


def test_redis_data_dir_is_a_persistent_volume() -> None:
    data_dir = parse_redis_conf()["dir"]
    declared = compose().get("volumes") or {}
    mounts = [str(v).split(":") for v in services()["redis"].get("volumes", [])]
    sources = [m[0] for m in mounts if len(m) >= 2 and m[1] == data_dir]
    assert sources and sources[0] in declared, f"redis dir {data_dir} is not a named volume"


# --------------------------------------------------------------------------- files exist


def test_referenced_files_exist() -> None:
    for name, svc in services().items():
        build = build_of(svc)
        if build is not None:
            context = DOCKER_DIR / build["context"]
            assert context.is_dir(), f"{name}: build context {context} missing"
            dockerfile = context / build["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            if build.get("target"):
                names = {s.name for s in parse_dockerfile(dockerfile.resolve())}
                assert build["target"] in names, f"{name}: no stage {build['target']!r}"
        for volume in svc.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER_DIR / source).exists(), f"{name}: mounted {source} missing"
        env_files = svc.get("env_file", [])
        for entry in [env_files] if isinstance(env_files, str | dict) else env_files:
            path, required = (
                (entry, True)
                if isinstance(entry, str)
                else (entry["path"], entry.get("required", True))
            )
            if required:
                assert (DOCKER_DIR / path).is_file(), f"{name}: env_file {path} missing"


@each_dockerfile
def test_dockerfile_copy_sources_exist(dockerfile: Path) -> None:
    copies = instructions(list(parse_dockerfile(dockerfile)), "COPY")
    assert copies, f"{dockerfile.name}: copies nothing"
    for args in copies:
        words = [w for w in args.split() if not w.startswith("--")]
        for source in words[:-1]:
            if not any(ch in source for ch in "*?["):
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} missing"


# --------------------------------------------------------------------------- images


def test_worker_image_installs_the_torch_extra() -> None:
    chain = stage_chain(WORKER_DOCKERFILE)
    installs = pip_installs(chain)
    assert any("worker" in extras for extras in installs.local_extras), installs
    extras = set().union(*installs.local_extras)
    assert "torch" in extra_packages(extras)
    assert "torch" not in {requirement_name(p) for p in installs.packages}, (
        "pin torch in pyproject's worker extra, not in the Dockerfile"
    )


def test_producer_image_installs_no_torch() -> None:
    assert "torch" not in {requirement_name(r) for r in pyproject()["project"]["dependencies"]}, (
        "core dependencies must stay torch-free"
    )
    for stage in parse_dockerfile(PRODUCER_DOCKERFILE):
        installs = pip_installs(stage_chain(PRODUCER_DOCKERFILE, stage.name))
        assert installs.local_extras, f"stage {stage.name}: the package is never installed"
        extras = set().union(*installs.local_extras)
        assert "torch" not in extra_packages(extras), f"stage {stage.name} pulls torch"
        assert "torch" not in {requirement_name(p) for p in installs.packages}
    default = pip_installs(stage_chain(PRODUCER_DOCKERFILE))
    assert default.local_extras == [set()], "the default producer target is `pip install .`"


def test_base_images_and_entrypoints() -> None:
    worker = parse_dockerfile(WORKER_DOCKERFILE)
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-cudnn-runtime-ubuntu2[24]\.04", worker[0].base)
    assert json.loads(instructions(stage_chain(WORKER_DOCKERFILE), "ENTRYPOINT")[-1]) == [
        "pipeq",
        "worker",
    ]
    assert any("python3.11" in run for run in instructions(list(worker), "RUN"))
    producer = parse_dockerfile(PRODUCER_DOCKERFILE)
    assert producer[0].base == "python:3.11-slim"
    for stage in producer:
        if stage.name == "base":
            continue
        entry = instructions(stage_chain(PRODUCER_DOCKERFILE, stage.name), "ENTRYPOINT")
        assert entry and json.loads(entry[-1]) == ["pipeq"], stage.name


def test_worker_healthcheck_and_model_cache() -> None:
    chain = stage_chain(WORKER_DOCKERFILE)
    health = instructions(chain, "HEALTHCHECK")
    assert health and re.search(r'CMD \["pipeq",\s*"status"', health[-1]), health
    envs = " ".join(instructions(chain, "ENV"))
    assert re.search(r"\bHF_HOME=/models\b", envs)
    args = dict(a.partition("=")[::2] for a in instructions(chain, "ARG"))
    assert args.get("BAKE_MODEL", "").strip("\"'") == "", "no model baked in by default"
    assert "TORCH_INDEX_URL" in args
    runs = instructions(chain, "RUN")
    assert any("TORCH_INDEX_URL" in r and "pip install" in r for r in runs)
    order = [(i, a) for i, a in chain[-1].instructions if i in {"RUN", "VOLUME"}]
    bake = next(n for n, (i, a) in enumerate(order) if i == "RUN" and "BAKE_MODEL" in a)
    volume = next(n for n, (i, a) in enumerate(order) if i == "VOLUME" and "/models" in a)
    assert bake < volume, "VOLUME /models after the bake step, or the baked model is discarded"
    assert re.search(r'-n "\$BAKE_MODEL"', order[bake][1]), "bake must be opt-in"


@each_dockerfile
def test_images_run_as_non_root(dockerfile: Path) -> None:
    for stage in parse_dockerfile(dockerfile):
        user = effective_user(stage_chain(dockerfile, stage.name))
        assert not is_root(user), f"{dockerfile.name} stage {stage.name} runs as {user}"
    for name, svc in services().items():
        if "user" in svc:
            assert not is_root(str(svc["user"])), f"{name} overrides user to root"


# --------------------------------------------------------------------------- secrets


def test_no_hardcoded_secrets_in_compose() -> None:
    for path, value in walk(compose()):
        key = re.split(r"[.\[]", path.rsplit(".", 1)[-1])[0]
        if isinstance(value, str | int | float) and SECRET_KEY.search(key):
            assert REQUIRED_VAR.match(str(value)), f"{path}: secret must be ${{VAR:?...}}"
        if isinstance(value, str):
            for password in URL_PASSWORD.findall(value):
                assert REQUIRED_VAR.match(password), f"{path}: password in URL must be ${{VAR}}"
    for name, svc in services().items():
        command = (
            [str(a) for a in svc.get("command") or []]
            if isinstance(svc.get("command"), list)
            else str(svc.get("command", "")).split()
        )
        if "--requirepass" in command:
            assert REQUIRED_VAR.match(flag_value(command, "--requirepass")), name
    flower_env = services()["flower"]["environment"]
    for var in ("PIPEQ_FLOWER_USER", "PIPEQ_FLOWER_PASSWORD"):
        assert REQUIRED_VAR.match(str(flower_env.get(var))), f"flower needs {var} set"


@each_dockerfile
def test_no_secrets_in_dockerfiles(dockerfile: Path) -> None:
    for stage in parse_dockerfile(dockerfile):
        for instr, args in stage.instructions:
            if instr in {"ENV", "ARG"}:
                assert not SECRET_KEY.search(args), f"{dockerfile.name}: {instr} {args}"
            assert not URL_PASSWORD.search(args), f"{dockerfile.name}: credentials in {args}"

"""Static checks of the Docker deployment files: compose.yaml and settings/redis.conf.

No Docker engine, no network (the Dockerfiles: test_docker_images.py).
"""

from __future__ import annotations

from pathlib import Path

from docker_support import (
    DOCKER_DIR,
    EXPECTED_WORKERS,
    PRODUCER_DOCKERFILE,
    REDIS_CONF,
    REQUIRED_VAR,
    ROOT,
    build_of,
    compose,
    dockerfile_of,
    each_dockerfile,
    extra_packages,
    flag_value,
    gpu_devices,
    instructions,
    parse_dockerfile,
    parse_redis_conf,
    pip_installs,
    services,
    stage_chain,
    worker_services,
)

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

"""Static checks of the Dockerfiles: images, users, installs and secrets (no Docker engine)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from docker_support import (
    PRODUCER_DOCKERFILE,
    REQUIRED_VAR,
    SECRET_KEY,
    URL_PASSWORD,
    WORKER_DOCKERFILE,
    compose,
    each_dockerfile,
    effective_user,
    extra_packages,
    flag_value,
    instructions,
    is_root,
    parse_dockerfile,
    pip_installs,
    pyproject,
    requirement_name,
    services,
    stage_chain,
    walk,
)

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

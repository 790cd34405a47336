"""What ``pip install pipeq`` puts on a machine: one top-level package, light by default.

A web app with its own ``producer.py`` or ``worker.py`` must not collide with pipeq, and a
producer-only install must work without torch.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT


def test_the_wheel_installs_only_the_pipeq_package(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = tmp_path.glob("pipeq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"pipeq"}
    for shipped in ("pipeq/py.typed", "pipeq/core/lua/job_finish.lua",
                    "pipeq/core/lua/ring.lua", "pipeq/worker/broker/lua/claim.lua",
                    "pipeq/worker/broker/lua/lease.lua",
                    "pipeq/worker/serve.py", "pipeq/ops/cli.py", "pipeq/gateway/app.py",
                    "pipeq/core/lua/webhook_claim.lua"):
        assert shipped in names, shipped
    assert not any(n.startswith(("producer/", "worker/")) for n in names)


def test_the_client_and_cli_import_without_torch(tmp_path: Path) -> None:
    # A module set to None in sys.modules cannot be imported: torch "is not installed".
    code = ("import sys\n"
            "for name in ('torch', 'transformers', 'numpy', 'PIL'):\n"
            "    sys.modules[name] = None\n"
            "import pipeq, pipeq.ops.cli\n"
            "from pipeq import pipeline, get_job, Job, Settings\n"
            "import pipeq.errors\n"
            "import pipeq.gateway.app  # the gateway extra needs no torch either\n"
            "assert pipeq.ops.cli.main(['--version']) == 0\n")
    done = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, timeout=60,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pipeq, version ")

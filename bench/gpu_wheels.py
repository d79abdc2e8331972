"""The wheels `make gpu-check` needs on a GPU machine that reaches no package registry: downloaded here (`make
gpu-wheels`) into build/gpu-wheels, carried along with the source tree, installed there into build/gpu-site.

The device image (docs/distributed.md) has Python 3.12 with torch, transformers, peft, accelerate, safetensors,
tokenizers, tiktoken, numpy, PyYAML, tqdm and requests; tinylm from source lacks only jsonargparse (with
docstring_parser and typeshed_client for its signatures), gguf for GGUF import and export, and bitsandbytes for QLoRA.
Each is pinned to constraints.txt's version; bitsandbytes, not a dev dependency, to a release whose wheel holds
kernels for CUDA 13, which the image's torch is built for. Each wheel is fetched without its dependencies: the list
above is the whole closure.

    python bench/gpu_wheels.py [--into build/gpu-wheels]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICE_PACKAGES = ("jsonargparse", "docstring_parser", "typeshed_client", "gguf", "bitsandbytes")
"""What tinylm's checks import that the device image lacks."""
ON_THE_IMAGE = ("numpy", "packaging", "PyYAML", "requests", "torch", "tqdm", "typing_extensions")
"""What those packages need in turn, all of it on the image already."""
BITSANDBYTES = "0.50.2"
DEVICE_PYTHON = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
"""pip matches manylinux tags exactly: every tag a pure or x86-64 wheel of the packages above may carry."""
CARRY_LIMIT = 64 * 2**20
"""Bytes a device call carries: the working tree that travels and the carried folders together."""


def normalized(name: str) -> str:
    """A distribution name as PyPI compares them (PEP 503): docstring-parser and docstring_parser are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(constraints: str) -> list[str]:
    """`name==version` for each of DEVICE_PACKAGES, versions from the text of constraints.txt."""
    pins = {}
    for line in constraints.splitlines():
        name, separator, version = line.partition("==")
        if separator:
            pins[normalized(name.strip())] = version.split("#")[0].strip()
    pins.setdefault("bitsandbytes", BITSANDBYTES)
    missing = [name for name in DEVICE_PACKAGES if normalized(name) not in pins]
    if missing:
        raise SystemExit(f"constraints.txt pins no version of {', '.join(missing)}; add it (pip freeze shows it)")
    return [f"{name}=={pins[normalized(name)]}" for name in DEVICE_PACKAGES]


def download_command(folder: Path, wanted: list[str]) -> list[str]:
    platforms = [option for tag in PLATFORMS for option in ("--platform", tag)]
    return [
        sys.executable,
        *("-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"),
        *("--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms),
        *("--dest", str(folder), *wanted),
    ]


def travelling_bytes(repo: Path) -> int:
    """The size of what a device call sends of the repository: tracked files and untracked ones git does not
    ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout
    files = (repo / name for name in listed.decode().split("\0") if name)
    return sum(path.stat().st_size for path in files if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--into", type=Path, default=REPO / "build" / "gpu-wheels")
    args = parser.parse_args()
    wanted = requirements((REPO / "constraints.txt").read_text())
    shutil.rmtree(args.into, ignore_errors=True)  # one version of each: two would stop the install there
    subprocess.run(download_command(args.into, wanted), check=True)
    wheels = sorted(args.into.glob("*.whl"))
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    carried, tree = sum(wheel.stat().st_size for wheel in wheels), travelling_bytes(REPO)
    total = carried + tree
    print(
        f"{carried / 2**20:.1f} MiB of wheels + {tree / 2**20:.1f} MiB of working tree = {total / 2**20:.1f} MiB "
        f"of the {CARRY_LIMIT / 2**20:.0f} MiB a device call carries"
    )
    if total > CARRY_LIMIT:
        raise SystemExit(f"{args.into} and the working tree do not fit in one device call; drop bitsandbytes")


if __name__ == "__main__":
    main()

"""bench/gpu_wheels.py, the wheels `make gpu-wheels` downloads for the GPU check: exactly the packages the device image
lacks, pinned as constraints.txt pins them, with nothing they need left out; and the size of what a device call
carries."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
from conftest import REPO
from packaging.requirements import Requirement

sys.path.insert(0, str(REPO / "bench"))
import gpu_wheels

CONSTRAINTS = (REPO / "constraints.txt").read_text()


def test_each_package_is_pinned_to_the_constraints_version():
    wanted = dict(line.split("==") for line in gpu_wheels.requirements(CONSTRAINTS))
    assert list(wanted) == list(gpu_wheels.DEVICE_PACKAGES)
    for name, version in wanted.items():
        if name != "bitsandbytes":  # not a dev dependency: the venv does not have it
            assert importlib.metadata.version(name) == version
    assert wanted["bitsandbytes"] == gpu_wheels.BITSANDBYTES


def test_a_package_constraints_does_not_pin_is_named():
    without_gguf = "\n".join(line for line in CONSTRAINTS.splitlines() if not line.startswith("gguf=="))
    with pytest.raises(SystemExit, match=r"constraints\.txt pins no version of gguf"):
        gpu_wheels.requirements(without_gguf)


@pytest.mark.parametrize("package", [name for name in gpu_wheels.DEVICE_PACKAGES if name != "bitsandbytes"])
def test_what_each_package_needs_is_carried_or_on_the_image(package):
    """--no-deps fetches none of a wheel's dependencies: each must be in the list or on the image (bitsandbytes, not
    installed here, needs torch, numpy and packaging)."""
    extras = {"jsonargparse": "signatures"}  # what tinylm asks for: jsonargparse[signatures]
    environment = {"extra": extras.get(package, ""), "python_version": gpu_wheels.DEVICE_PYTHON}
    needed = [Requirement(text) for text in importlib.metadata.requires(package) or []]
    names = {gpu_wheels.normalized(r.name) for r in needed if r.marker is None or r.marker.evaluate(environment)}
    known = {gpu_wheels.normalized(name) for name in (*gpu_wheels.DEVICE_PACKAGES, *gpu_wheels.ON_THE_IMAGE)}
    assert names <= known


def test_the_download_asks_for_the_device_python_and_no_dependencies(tmp_path):
    command = gpu_wheels.download_command(tmp_path, ["gguf==0.19.0"])
    assert command[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in command and "--only-binary=:all:" in command
    assert command[command.index("--python-version") + 1] == "3.12"
    assert command[-3:] == ["--dest", str(tmp_path), "gguf==0.19.0"]
    assert "manylinux_2_24_x86_64" in command  # bitsandbytes' tag: pip matches tags exactly


def test_travelling_bytes_count_tracked_and_untracked_files_but_not_ignored_ones(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("/build/\n")
    (tmp_path / "tracked.py").write_bytes(b"x" * 1000)
    subprocess.run(["git", "-C", str(tmp_path), "add", "tracked.py"], check=True)
    (tmp_path / "new.py").write_bytes(b"y" * 300)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "big.whl").write_bytes(b"z" * 10_000)
    assert gpu_wheels.travelling_bytes(tmp_path) == 1000 + 300 + len("/build/\n")

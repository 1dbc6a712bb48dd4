"""Where a number came from: code version, package versions, device, machine."""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import subprocess
from pathlib import Path

import torch

PACKAGES = ("torch", "torchvision", "ffcv", "numpy")


def git_commit() -> str:
    """`git rev-parse HEAD` of the repository holding this package, or "unknown" (an installed copy, no git)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def provenance(device: torch.device) -> dict:
    """The fixed part of a run's provenance; the run adds data, timing and throughput fields."""
    return {
        "git_commit": git_commit(),
        "packages": package_versions(),
        "device": device_name(device),
        "python": platform.python_version(),
        "host": socket.gethostname(),
    }

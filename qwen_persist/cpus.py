"""How many CPUs this process may use: what ``writer="auto"`` decides by.

The writer process pays off only where the server has a core to spare (benchmarks/README.md,
"Performance II"), so "auto" counts the CPUs the process may actually run on: its CPU affinity (taskset,
cpuset) and the CPU quota of its control group (a container's ``--cpus``), cgroup v2 and v1, including
the quotas of the groups above its own, whichever is smallest."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(
    *, proc_cgroup: Path = Path("/proc/self/cgroup"), cgroup_root: Path = _CGROUP_ROOT
) -> float:
    """The CPUs this process may use: the smaller of its affinity and its cgroup quota (a fraction for a
    fractional quota, e.g. 1.5). The paths are parameters so a test can point them at a tree of its own."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform (macOS, Windows)
        cpus = float(os.cpu_count() or 1)
    quota = _cgroup_quota(proc_cgroup, cgroup_root)
    return min(cpus, quota) if quota is not None else cpus


def _cgroup_quota(proc_cgroup: Path, root: Path) -> float | None:
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:  # cgroup v2: "0::/path", the limit in cpu.max
            if (root / "cgroup.controllers").exists():  # mounted at the root (not a hybrid's v1 tree)
                quotas += _limits(root, path, _v2_limit)
        elif "cpu" in controllers.split(","):  # cgroup v1: cfs_quota_us and cfs_period_us
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if mount.is_dir():
                    quotas += _limits(mount, path, _v1_limit)
                    break
    return min(quotas) if quotas else None


def _limits(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The limits set on the group at ``path`` and on every group above it. (In a container the group's
    own path is often not visible under the mount, whose root is then the container's group.)"""
    found = []
    parts = [part for part in path.split("/") if part and part != ".."]
    for depth in range(len(parts), -1, -1):
        limit = read(mount.joinpath(*parts[:depth]))
        if limit is not None:
            found.append(limit)
    return found


def _v2_limit(group: Path) -> float | None:
    try:
        quota, period = (group / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else _ratio(quota, period)


def _v1_limit(group: Path) -> float | None:
    try:
        quota = (group / "cpu.cfs_quota_us").read_text().strip()
        period = (group / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return None if quota.startswith("-") else _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        value = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 and math.isfinite(value) else None

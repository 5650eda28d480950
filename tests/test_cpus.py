"""``writer="auto"``: the CPUs this process may use (affinity, cgroup v1 and v2 quotas) decide the writer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qwen_persist.config import ConfigurationError, build_settings
from qwen_persist.cpus import available_cpus
from qwen_persist.middleware import writer_mode

ROOT = Path(__file__).resolve().parent.parent


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _tree(tmp_path: Path, proc_cgroup: str, files: dict[str, str]) -> float:
    root = tmp_path / "cgroup"
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    root.mkdir(exist_ok=True)
    (tmp_path / "proc_cgroup").write_text(proc_cgroup)
    return available_cpus(proc_cgroup=tmp_path / "proc_cgroup", cgroup_root=root)


def test_a_cgroup_v2_quota_above_the_group_counts(tmp_path: Path) -> None:
    cpus = _tree(
        tmp_path,
        "0::/system.slice/app.service\n",
        {
            "cgroup.controllers": "cpu memory\n",
            "system.slice/cpu.max": "150000 100000\n",
            "system.slice/app.service/cpu.max": "max 100000\n",
        },
    )
    assert cpus == min(1.5, _affinity())


def test_a_container_sees_its_own_group_as_the_root(tmp_path: Path) -> None:
    """docker --cpus=1: /proc/self/cgroup names the host's path, the mount shows the group at its root."""
    files = {"cgroup.controllers": "cpu\n", "cpu.max": "100000 100000\n"}
    assert _tree(tmp_path, "0::/docker/0123abcd\n", files) == 1.0


def test_cgroup_v1_quota_and_no_limit(tmp_path: Path) -> None:
    limited = {
        "cpu,cpuacct/kubepods/pod1/cpu.cfs_quota_us": "50000\n",
        "cpu,cpuacct/kubepods/pod1/cpu.cfs_period_us": "100000\n",
    }
    assert _tree(tmp_path / "a", "4:cpu,cpuacct:/kubepods/pod1\n", limited) == 0.5
    unlimited = {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert _tree(tmp_path / "b", "2:cpu:/\n1:name=systemd:/\n", unlimited) == _affinity()


def test_unreadable_or_odd_cgroup_files_leave_the_affinity(tmp_path: Path) -> None:
    odd = {"cgroup.controllers": "", "cpu.max": "garbage\n"}
    assert _tree(tmp_path / "a", "0::/\n", odd) == _affinity()
    assert available_cpus(proc_cgroup=tmp_path / "missing", cgroup_root=tmp_path) == _affinity()


def test_auto_is_the_default_and_modes_are_checked() -> None:
    assert build_settings(database_url="sqlite:///x.db", environ={}).writer == "auto"
    assert (
        build_settings(database_url="sqlite:///x.db", environ={"QWEN_PERSIST_WRITER": "Thread"}).writer
        == "thread"
    )
    with pytest.raises(ConfigurationError, match="writer must be one of auto, process, thread"):
        build_settings(database_url="sqlite:///x.db", writer="child", environ={})


def test_a_redact_hook_keeps_the_writer_in_the_server_process() -> None:
    for mode in ("auto", "process"):
        settings = build_settings(
            database_url="sqlite:///x.db", writer=mode, redact=lambda value: value, environ={}
        )
        assert writer_mode(settings) == "thread"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_auto_follows_the_cpus_this_process_may_use() -> None:
    """A real process: pinned to one CPU, "auto" keeps the thread; with every CPU of a machine that has
    two or more, it starts the writer process."""
    script = textwrap.dedent(
        """
        import os, sys
        from qwen_persist.config import build_settings
        from qwen_persist.middleware import writer_mode
        if sys.argv[1] == "pinned":
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        print(writer_mode(build_settings(database_url="sqlite:///x.db", environ={})))
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("QWEN_PERSIST_WRITER", None)

    def mode(how: str) -> str:
        done = subprocess.run([sys.executable, "-c", script, how], env=env, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode().strip()

    assert mode("pinned") == "thread"
    expected = "process" if available_cpus() >= 2 else "thread"
    assert mode("free") == expected

"""An installed wheel carries its migrations: a pip user has no checkout."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLES = {"sessions", "requests", "responses"}


def run(*argv: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(arg) for arg in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def tables(path: Path) -> set[str]:
    connection = sqlite3.connect(path)
    try:
        return {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        connection.close()


def test_wheel_runs_migrations_without_a_checkout(tmp_path: Path) -> None:
    # Build from a copy of the tree: an in-tree build writes build/ and *.egg-info, which would race
    # with anyone else building in the same checkout.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".venv", "*.db", "*.db-*"
        ),
    )
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", wheels, ".", cwd=source)
    (wheel,) = wheels.glob("qwen_persist-*.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    run(bin_dir / "python", "-m", "pip", "install", "--quiet", wheel, cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.pop("QWEN_PERSIST_DATABASE_URL", None)

    located = run(
        bin_dir / "python",
        "-c",
        "from qwen_persist.migrate import script_location; print(script_location())",
        cwd=work,
        env=env,
    )
    assert Path(located.strip()).is_relative_to(venv)

    run(bin_dir / "qwen-persist", "db", "upgrade", "--database-url", "sqlite:///x.db", cwd=work, env=env)
    assert tables(work / "x.db") >= TABLES

    (work / "alembic.ini").write_text("[alembic]\nscript_location = qwen_persist:migrations\n")
    run(
        bin_dir / "alembic",
        "upgrade",
        "head",
        cwd=work,
        env={**env, "QWEN_PERSIST_DATABASE_URL": "sqlite:///y.db"},
    )
    assert tables(work / "y.db") >= TABLES

    # The main job runs from the wheel alone too: the examples it serves ship inside the package.
    output = run(bin_dir / "qwen-persist", "demo", "--database-url", "sqlite:///demo.db", cwd=work, env=env)
    assert "What the proxy stored (3 sessions, 5 requests, 5 responses)" in output
    assert tables(work / "demo.db") >= TABLES
    # And the read commands, with their terminal library, from the wheel's own dependencies.
    listed = run(
        bin_dir / "qwen-persist", "requests", "--database-url", "sqlite:///demo.db", cwd=work, env=env
    )
    assert "5 exchanges, newest first" in listed
    run(
        bin_dir / "qwen-persist",
        "export",
        "-o",
        "all.jsonl",
        "--database-url",
        "sqlite:///demo.db",
        cwd=work,
        env=env,
    )
    assert len((work / "all.jsonl").read_text().splitlines()) == 5

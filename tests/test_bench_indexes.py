"""The index benchmark cannot rot: each schema it compares is what it says, and its rows go in.

The benchmark itself (`python -m benchmarks.bench_indexes`) is never part of the test run.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from benchmarks import bench_indexes


def _indexes(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        names = {
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
                " AND tbl_name IN ('sessions', 'requests', 'responses')"
            )
        }
    conn.close()
    return names


def test_each_variant_is_its_schema_and_takes_the_rows(tmp_path: Path) -> None:
    templates = {
        variant: bench_indexes.sqlite_template(tmp_path, variant) for variant in bench_indexes.VARIANTS
    }
    schemas = {variant: _indexes(path) for variant, path in templates.items()}
    assert schemas["0006"] - schemas["0007"] == {"ix_sessions_chat_id"}
    assert schemas["0007"] - schemas["0007-created_at"] == set(bench_indexes.CREATED_AT)
    assert schemas["unique-only"] == set()
    rows = bench_indexes.make_rows(bench_indexes.BATCH_EXCHANGES + 3, 1_700_000_000_000)
    for variant, template in templates.items():
        # The constraints (NOT NULL, foreign keys, UNIQUE) take every row, across two transactions.
        assert bench_indexes.run_sqlite(template, tmp_path / f"run-{variant}.db", rows) > 0
        assert not (tmp_path / f"run-{variant}.db").exists()
    request, response = rows["requests"][0], rows["responses"][0]
    assert 800 < len(request[8]) < 1300 and 800 < len(response[8]) < 1300  # bodies of about 1 KB

"""``qwen-persist stats``: exchanges, errors, tokens and latency percentiles per day, hour and/or model."""

from __future__ import annotations

import argparse
from typing import Any

from ..cli import CLIError
from ..repositories import History, StatsRow
from ..repositories.stats import GROUPS
from .base import Column, Output, add_filter_options, add_output_options, request_filter, run

DEFAULT_GROUPS = ("day", "model")


def stats_document(row: StatsRow) -> dict[str, Any]:
    document = row.to_dict()
    document["error_rate"] = 1 - row.success_rate if row.success_rate is not None else None
    return document


def _groups(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in GROUPS]
    if not names or unknown:
        raise CLIError(f"--by: one or more of {', '.join(GROUPS)} (comma-separated); got {value!r}")
    if "day" in names and "hour" in names:
        raise CLIError("--by: day and hour cannot be combined")
    return names


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _percentiles(figures: dict[str, float | None]) -> str:
    return " / ".join(_ms(figures.get(name)) for name in ("p50", "p95", "p99"))


def _rate(row: StatsRow) -> str:
    return "-" if row.success_rate is None else f"{(1 - row.success_rate) * 100:.1f}%"


def _stats(args: argparse.Namespace) -> int:
    groups = _groups(args.by)

    def body(history: History, out: Output) -> int:
        found = request_filter(args)
        rows = history.stats.summary(found, group_by=groups)
        if out.as_json:
            for row in rows:
                out.json_line(stats_document(row))
            return 0
        columns = [Column(name) for name in groups] + [
            Column("exchanges", "number"),
            Column("errors", "number", drop=2),
            Column("error rate", "number"),
            Column("tokens in", "number", drop=4),
            Column("tokens out", "number", drop=3),
            Column("ms p50 / p95 / p99", "number"),
            Column("ttfb p50 / p95 / p99", "number", drop=1),
        ]
        table = [_cells(row, [row.group.get(name) for name in groups]) for row in rows]
        if len(rows) > 1:
            (total,) = history.stats.summary(found)
            table.append(_cells(total, ["all", *([""] * (len(groups) - 1))]))
        note = "days and hours are UTC; error rate: errors ÷ answered; ms: total duration; ttfb: first byte"
        out.table(columns, table, footer=note if rows else "no exchanges")
        return 0

    return run(args, body)


def _cells(row: StatsRow, keys: list[Any]) -> list[Any]:
    return [
        *keys,
        row.count,
        row.errors,
        _rate(row),
        row.prompt_tokens,
        row.completion_tokens,
        _percentiles(row.duration_ms),
        _percentiles(row.first_byte_ms),
    ]


def add_stats_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    stats = commands.add_parser(
        "stats",
        help="exchanges, error rate, tokens and latency percentiles per day and model",
        description="Figures per group of exchanges: count, errors, error rate, tokens in and out, and the "
        "p50/p95/p99 of the total duration and of the time to first byte.",
    )
    stats.add_argument(
        "--by",
        default=",".join(DEFAULT_GROUPS),
        metavar="GROUPS",
        help="group by hour, day and/or model, comma-separated (default: day,model)",
    )
    add_filter_options(stats)
    add_output_options(stats)
    stats.set_defaults(handler=_stats)

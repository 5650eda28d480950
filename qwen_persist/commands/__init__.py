"""The read commands of ``qwen-persist``: ``sessions``, ``requests``, ``show``, ``stats``, ``export``,
``cleanup`` and ``tail``, all on the repositories (`qwen_persist.repositories`)."""

from __future__ import annotations

import argparse

from .cleanup import add_cleanup_command
from .export import add_export_command
from .lists import add_list_commands
from .show import add_show_command
from .stats import add_stats_command
from .tail import add_tail_command


def add_read_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the read commands on ``qwen-persist``'s subparsers."""
    add_list_commands(commands)
    add_show_command(commands)
    add_stats_command(commands)
    add_export_command(commands)
    add_tail_command(commands)
    add_cleanup_command(commands)

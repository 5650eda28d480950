"""Entry point of the writer process: ``python -m qwen_persist.writer_child`` (see `writer_process.py`).

A module of its own, imported by nothing else, so that running it does not import it twice."""

import sys

from .writer_process import child_main

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))

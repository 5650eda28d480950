"""The example proxy as the fault suite runs it: ``uvicorn faults.proxy_app:app --app-dir tests``.

Built from the environment only (``UPSTREAM_BASE_URL`` and the middleware's ``QWEN_PERSIST_*`` options),
so one import string serves ``--workers N`` too. Unlike ``openai_proxy:app`` it does not force
``auto_upgrade``: the scenarios migrate first, as a deployment would, or say so in the environment.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

# The examples folder is not a package: put it on the path and import the proxy by name.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
openai_proxy = importlib.import_module("openai_proxy")

# The middleware's own lines (retries, spills, the counters at shutdown) are what a failure report needs;
# uvicorn configures only its own loggers, so without this only warnings would show, without a time.
_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(asctime)s pid=%(process)d %(levelname)s %(name)s: %(message)s"))
_logger = logging.getLogger("qwen_persist")
_logger.addHandler(_handler)
_logger.setLevel(logging.INFO)
_logger.propagate = False

app = openai_proxy.create_app()

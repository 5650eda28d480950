"""Locate the folders that live at the top of the repository but ship inside the wheel.

`alembic/` and `examples/` are laid out at the top level of a checkout (as `alembic init` and readers
expect) and mapped into the package at build time as `qwen_persist/migrations` and
`qwen_persist/examples`. An editable install does not see that mapping, so the checkout's own folder is
the fallback.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.resources import files
from pathlib import Path
from types import ModuleType

# Packaged name -> folder name at the top of a checkout.
_CHECKOUT_NAMES = {"migrations": "alembic", "examples": "examples"}


def bundled_dir(name: str) -> Path:
    """The folder ``name`` (``"migrations"`` or ``"examples"``) from the wheel, else from the checkout."""
    packaged = Path(str(files("qwen_persist") / name))
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / _CHECKOUT_NAMES[name]
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"qwen_persist is installed without its {name!r} folder (looked in {packaged})")


def load_example(module: str) -> ModuleType:
    """Import ``examples/<module>.py`` by path: the examples are scripts, not a package of ours."""
    path = bundled_dir("examples") / f"{module}.py"
    qualified = f"qwen_persist_examples.{module}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    spec = importlib.util.spec_from_file_location(qualified, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load example {module!r} from {path}")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = loaded
    spec.loader.exec_module(loaded)
    return loaded

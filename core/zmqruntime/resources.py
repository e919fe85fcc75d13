"""Where the bundled examples and GUI assets are, installed or in a checkout."""

from __future__ import annotations

import importlib.util
import sys
from importlib import resources
from pathlib import Path
from types import ModuleType


def resources_dir() -> Path:
    """The ``resources`` folder: inside the wheel when installed, else the checkout's."""
    packaged = Path(str(resources.files("zmqruntime"))) / "resources"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "resources"  # editable installs
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError("zmqruntime's resources folder is missing from this install")


def examples_dir() -> Path:
    return resources_dir() / "examples"


def example(name: str) -> tuple[str, str | None]:
    """Source of a bundled example pipeline and its config: ``example("acquisition")``."""
    folder = examples_dir()
    pipeline = folder / f"{name}_pipeline.py"
    if not pipeline.exists():
        known = ", ".join(list_examples()) or "none"
        raise FileNotFoundError(f"no bundled example {name!r} (known: {known})")
    config = folder / f"{name}_config.py"
    return pipeline.read_text(), config.read_text() if config.exists() else None


def list_examples() -> list[str]:
    return sorted(p.name[: -len("_pipeline.py")] for p in examples_dir().glob("*_pipeline.py"))


def load_example_module(name: str) -> ModuleType:
    """A helper module bundled beside the examples (pipelines run as source cannot
    import their neighbours): ``load_example_module("example_support")``."""
    qualified = f"zmqruntime_examples.{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    path = examples_dir() / f"{name}.py"
    spec = importlib.util.spec_from_file_location(qualified, path)
    if spec is None or spec.loader is None or not path.exists():
        raise FileNotFoundError(f"no bundled example module {name!r} at {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    spec.loader.exec_module(module)
    return module

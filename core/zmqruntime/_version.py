"""The package version, in a module of its own so that any module (the server among them)
can import it without pulling in the package root and everything it re-exports.

pyproject.toml's ``[project] version`` is the same string (tests/test_packaging.py checks).
"""

__version__ = "0.1.0"

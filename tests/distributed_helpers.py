"""The tests' process runner is the package's own (``autosyncbn.processes``)."""
from autosyncbn.processes import run_ranks

__all__ = ["run_ranks"]

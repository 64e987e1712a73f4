"""``autosyncbn.processes``: the public path of :mod:`autosyncbn.tools.processes` (the same module object)."""
import sys

from .tools import processes as _processes

sys.modules[__name__] = _processes

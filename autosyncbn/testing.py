"""``autosyncbn.testing``: the public path of :mod:`autosyncbn.tools.testing` (the same module object)."""
import sys

from .tools import testing as _testing

sys.modules[__name__] = _testing

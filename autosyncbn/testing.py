"""``autosyncbn.testing``: the public path of :mod:`autosyncbn.tools.testing` (the same module object)."""
import sys
from typing import TYPE_CHECKING

from .tools import testing as _testing

if TYPE_CHECKING:  # what type checkers see here: the module this name stands for
    from .tools.testing import *  # noqa: F403

sys.modules[__name__] = _testing

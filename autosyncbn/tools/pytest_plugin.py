"""A pytest plugin for users' own test suites: synchronized BatchNorm on a CPU-only CI.

Registered through the ``pytest11`` entry point, so installing autosyncbn is
enough; importing it costs nothing until a test asks for a fixture.

Fixtures:

- ``autosyncbn_installed``: ``autosyncbn.install()`` for the test, always
  uninstalled after it, even when the test fails.
- ``emulated_data_parallel``: a factory ``(module, num_replicas=4, *,
  explicit=False, **options) -> nn.DataParallel`` that runs ``num_replicas``
  replicas on the CPU, one thread each: ``EmulatedDataParallel``, or with
  ``explicit=True`` the explicit API's ``EmulatedDataParallelWithCallback``.

Example::

    def test_my_model_matches_one_device(autosyncbn_installed, emulated_data_parallel):
        model = MyModel()
        reference = copy.deepcopy(model)
        x = torch.randn(8, 3, 32, 32)
        torch.testing.assert_close(emulated_data_parallel(model, 4)(x), reference(x))
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest


@pytest.fixture
def autosyncbn_installed() -> Iterator[None]:
    """autosyncbn installed for this test only."""
    import autosyncbn

    with autosyncbn.patched():
        yield


@pytest.fixture
def emulated_data_parallel() -> Callable[..., Any]:
    """Make a DataParallel of N CPU replicas around a module (see the module docstring)."""
    from autosyncbn.testing import EmulatedDataParallel, EmulatedDataParallelWithCallback

    def make(module: Any, num_replicas: int = 4, *, explicit: bool = False, **options: Any) -> Any:
        if explicit:
            return EmulatedDataParallelWithCallback(module, num_replicas, **options)
        return EmulatedDataParallel(module, num_replicas, **options)

    return make

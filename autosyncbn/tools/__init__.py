"""The tools around the engine: the demo, the self-test, the migration, CPU replicas and processes for CI.

Nothing here runs in a training step. Public paths: ``python -m autosyncbn
demo|check|migrate``, ``autosyncbn.testing``, ``autosyncbn.processes`` and the
pytest plugin (registered by installing autosyncbn).
"""

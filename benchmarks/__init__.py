"""Benchmarks: programs (not tests) that measure Valkyrie against raw NATS baselines.

Run them from the repository root, e.g. ``.venv/bin/python benchmarks/dispatch.py --quick``.
Shared helpers live in ``benchmarks._report`` (figures, tables, JSON) and ``benchmarks._procs``
(subprocesses, the nats-server, CPU accounting).
"""

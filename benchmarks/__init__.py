"""Benchmarks: programs (not tests) that measure Valkyrie against raw NATS baselines.

Run them from the repository root, e.g. ``.venv/bin/python benchmarks/dispatch.py --quick``; see
``benchmarks/README.md``. Shared helpers: ``_report`` (percentiles, tables, JSON, environment),
``_procs`` (subprocesses, CPU accounting), ``_fleet`` (simulated runners, receipt recorder) and
``_profile`` (py-spy and cProfile summaries); the dispatch benchmark's parts are ``_phases``,
``_valkyrie_system``, ``_raw_systems``, ``_costs``, ``_targets`` and ``_dispatch_report``, and
``results_table`` generates the table of docs/benchmarks.md from the committed runs.
"""

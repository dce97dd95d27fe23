"""Helpers for the metrics tests: handlers with a registry the test can scrape, sample lookups."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests._helpers import config_for_test
from valkyrie import Bus, Settings, open_bus, run_workers
from valkyrie.config.live import LiveConfig
from valkyrie.config.load import LoadedConfig

#: (sample name, labels) -> value
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(registry: CollectorRegistry) -> tuple[set[str], Samples]:
    """What a scrape of ``registry`` shows: the family names it declares, and every sample."""
    return parse(generate_latest(registry).decode())


def parse(text: str) -> tuple[set[str], Samples]:
    """The family names (``# TYPE`` lines) and samples of a Prometheus text exposition."""
    families: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample ``name`` with exactly ``labels``, or ``None``."""
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of every sample ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and wanted <= lab)


@asynccontextmanager
async def plane_with_registry(
    settings: Settings,
    handlers: Sequence[str] | None = None,
    *,
    config: LoadedConfig | None = None,
) -> AsyncIterator[tuple[Bus, CollectorRegistry]]:
    """Run ``handlers`` (all by default) in this process; yield the bus and their registry."""
    loaded = config if config is not None else config_for_test(settings)
    registry = CollectorRegistry()
    async with open_bus(settings, embed=False, config=loaded.config) as (bus, _):
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            workers = functools.partial(run_workers, config=LiveConfig(loaded))
            await tg.start(workers, bus, registry, stop, list(handlers or []) or None)
            try:
                yield bus, registry
            finally:
                stop.set()

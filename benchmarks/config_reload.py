"""Config hot-reload benchmark: a change accepted -> every worker process runs it.

What runs: a nats-server (unless ``--nats-url``), the ``config`` handler in one worker subprocess
(``python -m valkyrie worker config``), and ``--workers`` more worker subprocesses (default five:
``intake``, ``dispatcher``, ``registry``, ``results``, ``supervisor``, one per process).

What is measured: ``--changes`` changes (after ``--warmup`` excluded ones), one at a time through
:class:`valkyrie.client.config.ConfigClient`, alternating ``dispatch.max_queue_scan`` between 1999
and 2000. For each change, the time from the revision's ``at_ms`` (stamped by the config handler just
before it writes the revision to the config bucket, i.e. when the change is accepted) to the moment
the last of the workers runs it. Each worker's health reporter (``valkyrie/runtime/health.py``) publishes a
``HealthReport`` on ``<prefix>.health.<component>`` at once after it applies a revision; the
benchmark takes, per worker, the first report whose ``config_revision`` is the new one or later.

Rows of the table (all in ms; one sample per change, the slowest worker):

* ``accepted -> all run it (report at_ms)``: the target figure; the report's ``at_ms`` is stamped by
  the worker after it applied the revision (and after the report's one KV read), epoch ms.
* ``accepted -> all reports received``: the same, with the benchmark's receipt time of the report.
* ``accepted -> all applied (worker logs)``: ``LiveConfig`` logs ``epoch_ms`` (sub-ms) at the
  moment it swaps the config; read from the worker logs after the run, a cross-check.
* ``verdict -> all reports received``: from the verdict reaching the requester (the config
  handler writes the revision before it replies, so this can be small or negative).
* ``change round trip``: requester publishes the change -> verdict received.

All clocks are the same host's wall clock. Target: p99 of the first row <= 100 ms.

Run from the repository root::

    .venv/bin/python benchmarks/config_reload.py               # 50 changes, 5 workers
    .venv/bin/python benchmarks/config_reload.py --changes 10  # quicker

Exit status: 0 when every change reached every worker and the target was met; 2 when the target
was missed; 1 when a change did not reach every worker in time or something failed; 130 when
interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any  # noqa: E402

import anyio  # noqa: E402
import msgspec  # noqa: E402
import nats.errors  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402

from benchmarks._procs import Children  # noqa: E402
from benchmarks._report import (  # noqa: E402
    environment,
    render_table,
    summarize_ms,
    timestamp,
    write_json,
)
from schemas import HealthReport  # noqa: E402
from valkyrie import Bus, NatsServer, Settings, connect  # noqa: E402
from valkyrie.bus.codec import CONFIG_REVISION_DECODER  # noqa: E402
from valkyrie.bus.kv import watch_kv  # noqa: E402
from valkyrie.client.config import ConfigClient  # noqa: E402
from valkyrie.config.live import CONFIG_KEY  # noqa: E402
from valkyrie.config.model import ValkyrieConfig  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "config_reload.json"
DEFAULT_WORKERS = ("intake", "dispatcher", "registry", "results", "supervisor")
KEY = "dispatch.max_queue_scan"
TARGET_P99_MS = 100.0
_APPLIED = re.compile(r"config revision (\d+) applied .*?epoch_ms=([0-9.]+)")
_REPORT = msgspec.json.Decoder(HealthReport)


def log(message: str) -> None:
    """Progress on stderr (stdout carries the table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wall_ms() -> float:
    return time.time() * 1000


@dataclass(frozen=True)
class Params:
    changes: int
    warmup: int
    workers: list[str]
    pause_ms: float
    wait_s: float
    nats_url: str | None


@dataclass
class Seen:
    """Per worker instance: the first report of each revision (report at_ms, receipt ms)."""

    component: str
    pid: int | None
    first: dict[int, tuple[int, float]] = field(default_factory=dict)
    revision: int = 0


@dataclass
class Change:
    revision: int
    value: int
    sent_ms: float
    verdict_ms: float
    at_ms: int | None = None
    reports: dict[str, tuple[int, float]] = field(default_factory=dict)  # instance -> first report
    applied_log_ms: dict[str, float] = field(default_factory=dict)  # worker -> LiveConfig apply


class Watch:
    """Health reports of the worker processes, and the revisions' ``at_ms`` from the bucket."""

    def __init__(self, components: set[str]) -> None:
        self.components = components
        self.instances: dict[str, Seen] = {}
        self.at_ms: dict[int, int] = {}
        self.changed = anyio.Event()

    def _poke(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def on_report(self, msg: Msg) -> None:
        received = wall_ms()
        try:
            report = _REPORT.decode(msg.data)
        except msgspec.DecodeError:
            return
        if report.component not in self.components or report.stopping:
            return
        seen = self.instances.setdefault(report.instance, Seen(report.component, report.pid))
        # every revision up to the reported one is run from this report on
        if report.config_revision > seen.revision:
            for number in range(seen.revision + 1, report.config_revision + 1):
                seen.first.setdefault(number, (report.at_ms, received))
            seen.revision = report.config_revision
        self._poke()

    async def follow_revisions(
        self, bus: Bus, *, task_status: Any = anyio.TASK_STATUS_IGNORED
    ) -> None:
        changes = watch_kv(await bus.kv("config"), CONFIG_KEY, started=task_status.started)
        async with contextlib.aclosing(changes):
            async for change in changes:
                if change.value is not None:
                    revision = CONFIG_REVISION_DECODER.decode(change.value)
                    self.at_ms[revision.revision] = revision.at_ms
                    self._poke()

    def ready(self, expected: int) -> bool:
        return len(self.instances) >= expected

    def all_run(self, revision: int) -> bool:
        return (
            bool(self.instances)
            and all(revision in s.first for s in self.instances.values())
            and revision in self.at_ms
        )

    async def wait(self, check: Any, timeout_s: float) -> bool:
        with anyio.move_on_after(timeout_s):
            while not check():
                with anyio.move_on_after(0.5):
                    await self.changed.wait()
            return True
        return False


def worker_env(url: str, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALKYRIE_")}
    env.update({"VALKYRIE_NATS_URL": url, "VALKYRIE_PREFIX": prefix, "VALKYRIE_METRICS_PORT": "0"})
    return env


def read_applied(logfile: Path) -> dict[int, float]:
    try:
        text = logfile.read_text(errors="replace")
    except OSError:
        return {}
    return {int(m.group(1)): float(m.group(2)) for m in _APPLIED.finditer(text)}


async def run(params: Params, url: str, children: Children, workdir: Path) -> dict[str, Any]:
    prefix = "bench" + uuid.uuid4().hex[:8]
    env = worker_env(url, prefix)
    python = sys.executable
    settings = Settings.from_env({}, nats_url=url, prefix=prefix)
    bus = await connect(settings, name="bench-config-reload")
    errors: list[str] = []
    changes: list[Change] = []
    logs: dict[str, Path] = {}
    try:
        # the model's defaults: the worker processes (no config variables) provision the same
        await bus.provision(ValkyrieConfig())
        watch = Watch(set(params.workers))
        sub = await bus.nc.subscribe(bus.names.health("*"), cb=watch.on_report)
        async with anyio.create_task_group() as tg:
            await tg.start(watch.follow_revisions, bus)
            log("starting the config handler")
            config_log = workdir / "config.log"
            children.spawn(
                "config",
                [python, "-m", "valkyrie", "worker", "config"],
                env=env,
                log=config_log,
                cwd=ROOT,
            )
            client = ConfigClient(bus, actor="bench")
            log(f"starting {len(params.workers)} workers: {' '.join(params.workers)}")
            for i, handler in enumerate(params.workers):
                logs[f"{handler}-{i}"] = workdir / f"{handler}-{i}.log"
                children.spawn(
                    f"{handler}-{i}",
                    [python, "-m", "valkyrie", "worker", handler],
                    env=env,
                    log=logs[f"{handler}-{i}"],
                    cwd=ROOT,
                )
            if not await watch.wait(lambda: watch.ready(len(params.workers)), 90):
                dead = [c.name for c in children.started if c.proc.poll() is not None]
                raise RuntimeError(
                    f"only {len(watch.instances)} of {len(params.workers)} workers reported "
                    f"health within 90 s (exited: {dead or 'none'})"
                )
            log(f"{len(watch.instances)} workers report health; config handler warming up")
            total = params.warmup + params.changes
            for i in range(total):
                value = 1999 if i % 2 == 0 else 2000
                sent = wall_ms()
                verdict = await client.change(
                    set_values={KEY: value}, reason=f"bench {i}", timeout_s=30
                )
                received = wall_ms()
                if not verdict.accepted or verdict.revision is None:
                    raise RuntimeError(f"change {i} refused: {verdict.errors}")
                number = verdict.revision
                if not await watch.wait(lambda n=number: watch.all_run(n), params.wait_s):
                    behind = [
                        s.component for s in watch.instances.values() if number not in s.first
                    ]
                    errors.append(f"revision {number}: not run by {behind} within {params.wait_s}s")
                    continue
                if i >= params.warmup:
                    changes.append(
                        Change(
                            revision=number,
                            value=value,
                            sent_ms=sent,
                            verdict_ms=received,
                            at_ms=watch.at_ms[number],
                            reports={k: s.first[number] for k, s in watch.instances.items()},
                        )
                    )
                if params.pause_ms:
                    await anyio.sleep(params.pause_ms / 1000)
                if (i + 1) % 10 == 0:
                    log(f"{i + 1}/{total} changes")
            tg.cancel_scope.cancel()
        await sub.unsubscribe()
    finally:
        with anyio.CancelScope(shield=True):
            await bus.close()
    await anyio.sleep(0.2)  # the last log lines
    applied = {name: read_applied(path) for name, path in logs.items()}
    for c in changes:
        c.applied_log_ms = {n: a[c.revision] for n, a in applied.items() if c.revision in a}
    return document(params, changes, errors, prefix)


def document(
    params: Params, changes: list[Change], errors: list[str], prefix: str
) -> dict[str, Any]:
    def slowest(values: list[float]) -> float:
        return max(values)

    at_report = [slowest([r[0] for r in c.reports.values()]) - (c.at_ms or 0) for c in changes]
    at_received = [slowest([r[1] for r in c.reports.values()]) - (c.at_ms or 0) for c in changes]
    at_logs = [
        slowest(list(c.applied_log_ms.values())) - (c.at_ms or 0)
        for c in changes
        if len(c.applied_log_ms) == len(params.workers)
    ]
    per_worker = [r[0] - (c.at_ms or 0) for c in changes for r in c.reports.values()]
    verdict_to_all = [slowest([r[1] for r in c.reports.values()]) - c.verdict_ms for c in changes]
    round_trip = [c.verdict_ms - c.sent_ms for c in changes]
    rows = {
        "accepted -> all run it (report at_ms)": summarize_ms(at_report),
        "accepted -> all reports received": summarize_ms(at_received),
        "accepted -> all applied (worker logs)": summarize_ms(at_logs),
        "accepted -> each worker (report at_ms)": summarize_ms(per_worker),
        "verdict -> all reports received": summarize_ms(verdict_to_all),
        "change round trip (send -> verdict)": summarize_ms(round_trip),
    }
    p99 = rows["accepted -> all run it (report at_ms)"]["p99"]
    return {
        "benchmark": "config_reload",
        "timestamp": timestamp(),
        "params": asdict(params),
        "prefix": prefix,
        "signal": "HealthReport.config_revision on <prefix>.health.<component> (valkyrie/runtime/health.py)",
        "key": KEY,
        "summary_ms": rows,
        "target": {
            "p99_ms": TARGET_P99_MS,
            "p99_measured_ms": p99,
            "met": p99 is not None and p99 <= TARGET_P99_MS,
        },
        "measured_changes": len(changes),
        "errors": errors,
        "changes": [asdict(c) for c in changes],
        "environment": environment(),
    }


def render(doc: dict[str, Any]) -> str:
    headers = ["ms (one sample per change)", "count", "p50", "p95", "p99", "max", "mean"]
    rows = [
        [name, s["count"], s["p50"], s["p95"], s["p99"], s["max"], s["mean"]]
        for name, s in doc["summary_ms"].items()
    ]
    target = doc["target"]
    verdict = "met" if target["met"] else "MISSED"
    lines = [
        f"config reload: {doc['measured_changes']} changes of {doc['key']}, "
        f"{len(doc['params']['workers'])} worker processes ({' '.join(doc['params']['workers'])})",
        "",
        render_table(headers, rows),
        "",
        f"target p99 <= {target['p99_ms']:g} ms: {verdict} ({target['p99_measured_ms']} ms)",
    ]
    if doc["errors"]:
        lines += ["", "errors:", *(f"  {e}" for e in doc["errors"])]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> tuple[Params, Path, bool]:
    parser = argparse.ArgumentParser(
        prog="benchmarks/config_reload.py",
        description="Time from an accepted config change to every worker process running it.",
    )
    parser.add_argument("--changes", type=int, default=50, help="measured changes")
    parser.add_argument("--warmup", type=int, default=3, help="changes before, not measured")
    parser.add_argument(
        "--workers",
        default=",".join(DEFAULT_WORKERS),
        help="comma-separated handler per worker process (repeat a name for more processes)",
    )
    parser.add_argument(
        "--pause-ms", type=float, default=50.0, help="pause after each change has reached everyone"
    )
    parser.add_argument(
        "--wait-s", type=float, default=10.0, help="give up on a change after this many seconds"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the JSON")
    parser.add_argument("--nats-url", default=None, help="use this server instead of starting one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    a = parser.parse_args(argv)
    workers = [w.strip() for w in a.workers.split(",") if w.strip()]
    if a.changes <= 0 or a.warmup < 0 or not workers:
        parser.error("--changes must be positive, --warmup not negative, --workers not empty")
    if "config" in workers:
        parser.error("the config handler runs in its own process already")
    params = Params(a.changes, a.warmup, workers, a.pause_ms, a.wait_s, a.nats_url)
    return params, a.json, a.keep


def _interrupt(signum: int, frame: FrameType | None) -> None:
    signal.raise_signal(signal.SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; see the module docstring for the exit status."""
    params, json_path, keep = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="valkyrie-bench-config-"))
    children = Children()
    server: NatsServer | None = None
    try:
        url = params.nats_url
        if not url:
            server = NatsServer(store_dir=workdir / "nats", port=0, name="bench-config")
            server.start()
            url = server.url
            log(f"nats-server on {url}")
        doc = anyio.run(run, params, url, children, workdir)
        write_json(json_path, doc)
        print(render(doc), flush=True)
        print(f"\nJSON: {json_path}", flush=True)
        if doc["errors"] or doc["measured_changes"] < params.changes:
            return 1
        return 0 if doc["target"]["met"] else 2
    except KeyboardInterrupt:
        log("interrupted: stopping subprocesses and the server")
        return 130
    except (RuntimeError, nats.errors.Error) as e:
        log(f"failed: {e}")
        for child in children.started:
            log(f"--- {child.name} (exit {child.proc.poll()}):\n{child.tail(1500)}")
        return 1
    finally:
        try:
            children.stop_all()
        finally:
            if server is not None:
                server.stop()
            if keep:
                log(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

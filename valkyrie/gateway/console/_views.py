"""The console's fragments, rendered from what :mod:`._data` read (pure: data in, HTML out)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from schemas import (
    TERMINAL_STATES,
    Event,
    HealthSummary,
    JobExplanation,
    JobLog,
    JobRecord,
    QueueListRequest,
    RunnerRecord,
    RunnerState,
)
from valkyrie.domain.health import AVAILABLE_RUNNER_STATES
from valkyrie.gateway.console._data import JobsPage, QueuePage
from valkyrie.gateway.console._html import (
    Html,
    age,
    badge,
    button,
    esc,
    filters_form,
    link,
    section,
    short,
    table,
    when,
)
from valkyrie.runtime.discovery import DiscoveredService
from valkyrie.runtime.state_metrics import runner_pool_of

__all__ = ["job_view", "jobs_view", "overview_view", "queue_view", "runners_view"]

_EVENT_DETAILS = (
    "runner_id",
    "reason",
    "exit_code",
    "duration_ms",
    "score",
    "queued_ms",
    "from_runner",
)


def overview_view(
    *,
    summary: HealthSummary | None,
    fresh: bool,
    mode: str,
    revision: int,
    queue_held: int,
    queue_oldest_ms: int | None,
    groups: Sequence[tuple[str, str, str, int, int]],
    services: Sequence[DiscoveredService],
    now_ms: int,
) -> Html:
    """Health and mode, the queue at a glance, the runner pool, the running processes."""
    status = summary.status if summary is not None and fresh else "unknown"
    head = (
        f'<div class="cards">'
        f'<div class="card"><h3>Health</h3>{badge(status, health=status)}</div>'
        f'<div class="card"><h3>Mode</h3><span data-mode="{esc(mode)}">{esc(mode)}</span>'
        f" <small>config revision {revision}</small></div>"
        f'<div class="card"><h3>Queued</h3><span data-queued="{queue_held}">{queue_held}</span>'
        f" <small>oldest {age(queue_oldest_ms)}</small></div>"
    )
    if summary is not None:
        pool = summary.runner_pool
        head += (
            f'<div class="card"><h3>Runners</h3><span data-runners-available="{pool.available}">'
            f"{pool.available}</span> <small>available of {pool.total} (busy {pool.busy}, "
            f"draining {pool.draining}, offline {pool.offline})</small></div>"
        )
    head += "</div>"
    parts: list[object] = [Html(head)]
    if summary is None:
        parts.append(Html('<p class="note">No health summary yet: is a monitor running?</p>'))
    elif not fresh:
        parts.append(
            Html(
                f'<p class="note">The last monitor summary is {esc(age(now_ms - summary.at_ms))} '
                "old: is a monitor running?</p>"
            )
        )
    if summary is not None and summary.reasons:
        items = "".join(f"<li>{esc(r)}</li>" for r in summary.reasons)
        parts.append(section("Why", Html(f'<ul class="reasons">{items}</ul>')))
    if summary is not None:
        parts.append(
            section(
                "Components",
                table(
                    ["Component", "Instance", "Status", "Revision", "Last report", "Failing"],
                    [
                        (
                            c.component,
                            c.instance,
                            badge(c.status),
                            c.config_revision,
                            age(c.age_ms) + " ago",
                            "; ".join(f"{n}: {r.detail or r.status}" for n, r in c.failing.items())
                            or "-",
                        )
                        for c in summary.components
                    ],
                ),
            )
        )
    parts.append(
        section(
            "Queue by group",
            table(
                ["Job type", "Region", "Labels", "Queued", "Oldest"],
                [
                    (
                        link("/console/queue", jt, {"job_type": jt, "region": rg, "labels": lb}),
                        rg,
                        lb or "-",
                        n,
                        age(now_ms - oldest),
                    )
                    for jt, rg, lb, n, oldest in groups
                ],
                empty="no job waits for a runner",
            ),
        )
    )
    if summary is not None:
        parts.append(
            section(
                "Consumers",
                table(
                    ["Consumer", "Stream", "Pending", "Status", "Detail"],
                    [
                        (
                            c.durable,
                            c.stream,
                            "-" if c.pending is None else c.pending,
                            badge(c.status),
                            c.detail or "-",
                        )
                        for c in summary.consumers
                    ],
                ),
            )
        )
    parts.append(
        section(
            "Processes ($SRV)",
            table(
                [
                    "Process",
                    "Handlers",
                    "Version",
                    "Revision",
                    "Mode",
                    "Host",
                    "Messages",
                    "Errors",
                ],
                [
                    (
                        s.id,
                        ", ".join(s.handlers),
                        s.metadata.get("valkyrie_version", s.version),
                        s.metadata.get("config_revision", "-"),
                        s.metadata.get("mode", "-"),
                        f"{s.metadata.get('host', '?')}:{s.metadata.get('pid', '?')}",
                        sum(e.num_requests for e in s.endpoints),
                        sum(e.num_errors for e in s.endpoints),
                    )
                    for s in services
                ],
                empty="no process answers service discovery",
            ),
        )
    )
    return Html("".join(esc(p) for p in parts))


def queue_view(
    page: QueuePage, request: QueueListRequest, *, can_cancel: bool, now_ms: int
) -> Html:
    """The ledger's groups, then a page of queued jobs with their reasons."""
    ledger = page.ledger
    groups = table(
        ["Job type", "Region", "Labels", "Queued", "Oldest"],
        [
            (
                link(
                    "/console/queue",
                    g.job_type,
                    {"job_type": g.job_type, "region": g.region, "labels": g.labels},
                ),
                g.region,
                g.labels or "-",
                g.count,
                age(now_ms - g.oldest_queued_at_ms),
            )
            for g in ledger.groups[:50]
        ],
        empty="no job waits for a runner",
    )
    filters = filters_form(
        "/console/queue",
        [
            ("job_type", "Job type", request.job_type),
            ("region", "Region", request.region),
            ("labels", "Labels", request.labels),
            ("tenant", "Tenant", request.tenant),
        ],
    )
    rows, data = [], []
    for j in page.jobs:
        actions = button("Cancel", "cancel", job_id=j.job_id) if can_cancel else ""
        rows.append(
            (
                link(f"/console/jobs/{j.job_id}", short(j.job_id)),
                j.job_type,
                j.region,
                j.labels or "-",
                j.tenant,
                f"{j.priority} ({j.effective_priority})",
                age(now_ms - j.queued_at_ms),
                Html(f'<span class="reason">{esc(j.reason)}</span>'),
                actions,
            )
        )
        data.append({"job_id": j.job_id, "queued": "1"})
    jobs = table(
        ["Job", "Type", "Region", "Labels", "Tenant", "Priority (effective)", "Waiting", "Why", ""],
        rows,
        empty="no queued job matches",
        id_="queue-jobs",
        row_data=data,
    )
    current = {
        "job_type": request.job_type,
        "region": request.region,
        "labels": request.labels,
        "tenant": request.tenant,
    }
    pager = [link("/console/queue", "first page", current)]
    if page.more and page.jobs:
        pager.append(link("/console/queue", "next page", {**current, "after": page.jobs[-1].key}))
    notes = "".join(f'<p class="note">{esc(e)}</p>' for e in page.errors)
    if page.answered == 0:
        notes += '<p class="note">No dispatcher answered: is one running?</p>'
    summary = Html(
        f"<p>{ledger.held} queued in all (held by dispatchers); {page.matching} match the "
        f"filters; {page.answered} dispatcher(s) answered.</p>"
    )
    return Html(
        section("Queue by group", groups)
        + section(
            "Queued jobs",
            filters,
            summary,
            Html(notes),
            jobs,
            Html(f'<p class="pager">{" · ".join(pager)}</p>'),
        )
    )


def jobs_view(page: JobsPage, states: str | None, *, now_ms: int) -> Html:
    """Recently changed jobs, newest first, with an "older" link."""
    filters = filters_form("/console/jobs", [("state", "States (comma-separated)", states)])
    find = Html(
        '<form class="filters" data-find-job><label>Job id <input name="job_id"></label>'
        '<button type="submit">Open</button></form>'
    )
    rows = [
        (
            link(f"/console/jobs/{r.id}", short(r.id)),
            badge(r.state.value),
            r.spec.job_type,
            r.spec.priority,
            r.attempt,
            r.runner_id or "-",
            when(r.submitted_at_ms),
            age(now_ms - r.updated_at_ms) + " ago",
        )
        for r in page.jobs
    ]
    table_ = table(
        ["Job", "State", "Type", "Priority", "Attempt", "Runner", "Submitted (UTC)", "Changed"],
        rows,
        empty="no job matches",
        id_="recent-jobs",
        row_data=[{"job_id": r.id, "job_state": r.state.value} for r in page.jobs],
    )
    pager = [link("/console/jobs", "newest", {"state": states})]
    if page.before is not None:
        pager.append(link("/console/jobs", "older", {"state": states, "before": page.before}))
    return section(
        "Jobs, most recently changed first",
        find,
        filters,
        table_,
        Html(
            f'<p class="pager">{" · ".join(pager)} <small>({page.scanned} records read)</small></p>'
        ),
    )


def _event_details(event: Event) -> str:
    data = event.data or {}
    return ", ".join(f"{k}={data[k]}" for k in _EVENT_DETAILS if data.get(k) not in (None, ""))


def job_view(
    record: JobRecord,
    *,
    explanation: JobExplanation | None,
    explain_error: str | None,
    events: Sequence[tuple[int, Event]],
    events_cut: bool,
    logs: Sequence[JobLog],
    logs_cut: bool,
    can_cancel: bool,
    now_ms: int,
) -> Html:
    """One job: its state, why it waits (or where it went), its timeline and its log."""
    spec = record.spec
    state = record.state.value
    actions = ""
    if can_cancel and record.state not in TERMINAL_STATES:
        actions = button("Cancel job", "cancel", job_id=record.id)
    facts = [
        ("State", badge(state, job_state=state)),
        ("Type", spec.job_type),
        ("Priority", spec.priority),
        ("Labels", ", ".join(f"{k}={v}" for k, v in sorted(spec.labels.items())) or "-"),
        ("Attempt", record.attempt),
        ("Runner", record.runner_id or "-"),
        ("Submitted (UTC)", when(record.submitted_at_ms)),
        ("Waited / ran", age((record.finished_at_ms or now_ms) - record.submitted_at_ms)),
        ("Reason", record.reason or "-"),
    ]
    if record.result is not None:
        facts.append(
            ("Exit code", "-" if record.result.exit_code is None else record.result.exit_code)
        )
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    head = Html(
        f'<div class="job" data-job-id="{esc(record.id)}" data-job-state="{esc(state)}">'
        f'<h2>Job <code>{esc(record.id)}</code> {actions}</h2><dl class="facts">{dl}</dl></div>'
    )
    if explanation is not None:
        groups = table(
            ["Constraint", "Runners", "Why"],
            [(g.constraint, g.count, g.detail) for g in explanation.rejected],
            empty="no runner rejected it",
        )
        tips = "".join(f"<li>{esc(s)}</li>" for s in explanation.suggestions)
        pending = " pending" if record.state.value == "queued" else ""
        why = section(
            "Why" if record.state.value == "queued" else "Placement",
            Html(
                f'<p class="summary{pending}" data-explain="{esc(", ".join(explanation.causes))}">'
                f"{esc(explanation.summary)}</p>"
            ),
            groups,
            Html(f'<ul class="reasons">{tips}</ul>' if tips else ""),
        )
    else:
        why = section("Why", Html(f'<p class="note">{esc(explain_error or "no explanation")}</p>'))
    timeline = table(
        ["#", "Time (UTC)", "Event", "Attempt", "Source", "Details"],
        [
            (
                seq,
                when(e.at_ms),
                e.type,
                e.attempt if e.attempt is not None else "-",
                e.source,
                _event_details(e),
            )
            for seq, e in events
        ],
        empty="no event yet",
        id_="timeline",
        row_data=[{"event": e.type} for _, e in events],
    )
    cut = '<p class="note">only the first events are shown</p>' if events_cut else ""
    log_lines = "".join(
        f'<span class="log-{esc(batch.stream)}">{esc(line)}</span>\n'
        for batch in logs
        for line in batch.lines
    )
    more = (
        f'<p class="note">the first {len(logs)} batches of lines; the rest: '
        f"<code>valkyrie jobs logs {esc(record.id)}</code></p>"
        if logs_cut
        else ""
    )
    log = section(
        "Log", Html(f'<pre class="log" id="log">{log_lines or "no output yet"}</pre>{more}')
    )
    return Html(head + why + section("Timeline", timeline, Html(cut)) + log)


def runners_view(
    records: Sequence[RunnerRecord],
    *,
    state: str | None,
    pool: str | None,
    query: str | None,
    offset: int,
    limit: int,
    can_admin: bool,
    now_ms: int,
) -> Html:
    """A page of runners (filtered), with counts over all of them."""
    counts = Counter(r.state.value for r in records)
    matching = [
        r
        for r in records
        if (state is None or r.state.value == state)
        and (pool is None or runner_pool_of(r) == pool)
        and (not query or query.lower() in r.registration.runner_id.lower())
    ]
    page = matching[offset : offset + limit]
    rows, data = [], []
    for r in page:
        reg = r.registration
        rid = reg.runner_id
        action: object = ""
        if can_admin and r.state != RunnerState.OFFLINE:
            draining = r.drain_requested or r.state == RunnerState.DRAINING
            action = button(
                "Undrain" if draining else "Drain",
                "drain",
                runner_id=rid,
                drain="false" if draining else "true",
            )
        rows.append(
            (
                rid,
                badge(r.state.value),
                runner_pool_of(r),
                f"{len(r.assigned_jobs)} / {reg.max_concurrent_jobs}",
                age(now_ms - r.last_heartbeat_at_ms),
                f"{r.load:.2f}",
                ", ".join(reg.capabilities.job_types) or "-",
                ", ".join(f"{k}={v}" for k, v in sorted(reg.labels.items())) or "-",
                action,
            )
        )
        data.append({"runner_id": rid, "runner_state": r.state.value})
    available = sum(n for s, n in counts.items() if s in AVAILABLE_RUNNER_STATES)
    summary = Html(
        f"<p>{len(records)} runners: {available} available ("
        + ", ".join(f"{s} {counts.get(s.value, 0)}" for s in RunnerState)
        + f"); {len(matching)} match.</p>"
    )
    filters = filters_form(
        "/console/runners",
        [("state", "State", state), ("pool", "Pool (region)", pool), ("q", "Id contains", query)],
    )
    current = {"state": state, "pool": pool, "q": query}
    pager = []
    if offset > 0:
        pager.append(
            link("/console/runners", "previous", {**current, "offset": max(0, offset - limit)})
        )
    if offset + limit < len(matching):
        pager.append(link("/console/runners", "next", {**current, "offset": offset + limit}))
    return section(
        "Runners",
        summary,
        filters,
        table(
            ["Runner", "State", "Pool", "Slots", "Heartbeat", "Load", "Job types", "Labels", ""],
            rows,
            empty="no runner matches",
            id_="runners",
            row_data=data,
        ),
        Html(f'<p class="pager">{" · ".join(pager)}</p>'),
    )

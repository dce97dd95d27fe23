"""Job intake as pure domain logic: parse and check a submission, derive ids, build the record."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from schemas import (
    REDACTED,
    AncestorConversion,
    FieldError,
    JobRecord,
    JobState,
    JobSubmission,
    LegacyJobV1,
    SafeDecoder,
    convert_or_errors,
    depth_error,
    json_type_name,
    submission_from_ancestor,
    too_deep,
    unknown_fields,
    v1_to_v2,
)
from valkyrie.config.model import LimitsConfig
from valkyrie.domain.secrets import redact_spec, secret_env_errors
from valkyrie.errors import SchemaError

__all__ = [
    "ParsedSubmission",
    "RepeatedBy",
    "check_submission",
    "conflict_error",
    "idempotency_token",
    "job_id_for",
    "parse_submission",
    "queue_quota_error",
    "queued_record",
    "read_token",
    "request_digest",
    "storage_full_error",
    "token_for",
    "token_value",
]

_ID_NAMESPACE = uuid.UUID("6f1c3a52-8a0e-4d55-9a53-0b1f7a9a1e11")
_decoder: SafeDecoder[Any] = SafeDecoder()
_CANONICAL = msgspec.json.Encoder(order="sorted")
MAX_METADATA_ENTRIES = 64


@dataclass(frozen=True, slots=True)
class ParsedSubmission:
    """A valid submission, normalised to v2, and which API form it arrived in."""

    spec: JobSubmission
    api_version: Literal["v1", "v2"]
    warnings: tuple[FieldError, ...] = ()
    #: :func:`request_digest` of the body: what "the same submission" means for a duplicate
    digest: str = ""


def parse_submission(
    data: bytes,
    *,
    received_at_ms: int,
    max_bytes: int,
    max_metadata_entries: int = MAX_METADATA_ENTRIES,
    strict: bool = False,
) -> ParsedSubmission:
    """Decode a v2 or v1 body and check it; v1 is detected by a ``type`` key without ``job_type``.

    Fields the contract does not know are ignored with a warning each, or, when ``strict``,
    refused (a typo such as ``deadlin_at_ms`` for ``deadline_at_ms`` then cannot pass unnoticed).

    Raises:
        SchemaError: with every problem found, each naming its field: type errors and, for the
            fields that are well-typed, the rules of :func:`check_submission`. A body nested
            deeper than ``MAX_JSON_DEPTH`` is refused before it is decoded.
    """
    if len(data) > max_bytes:
        raise SchemaError(
            [
                FieldError(
                    path="$", reason=f"submission is {len(data)} bytes; the limit is {max_bytes}"
                )
            ]
        )
    if too_deep(data):
        raise SchemaError([depth_error()])
    try:
        obj = _decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise SchemaError([FieldError(path="$", reason=f"invalid JSON: {e}")]) from e
    if not isinstance(obj, dict):
        raise SchemaError(
            [FieldError(path="$", reason=f"Expected `object`, got `{json_type_name(obj)}`")]
        )
    legacy = "job_type" not in obj and "type" in obj
    digest = request_digest(obj)
    # the ancestor's v2 names (deadline, max_execution_time, ...) are converted, not dropped
    ancestor = None if legacy else submission_from_ancestor(obj)
    if ancestor is not None:
        obj = ancestor.body
    early = list(ancestor.errors) if ancestor is not None else []
    unknown = unknown_fields(LegacyJobV1 if legacy else JobSubmission, obj)
    if strict:
        early += [FieldError(path=p, reason="unknown field (strict)") for p in unknown]
    parsed, errors = _convert(obj, legacy=legacy, received_at_ms=received_at_ms)
    if parsed is not None:
        problems = early + _rule_errors(
            parsed, legacy=legacy, now_ms=received_at_ms, max_metadata=max_metadata_entries
        )
        if problems:
            raise SchemaError(_named(problems, ancestor))
        notes = list(ancestor.warnings) if ancestor is not None else []
        notes += [FieldError(path=p, reason="unknown field, ignored") for p in unknown]
        return ParsedSubmission(parsed.spec, parsed.api_version, tuple(notes), digest=digest)
    # Report the rules too, for the fields that are well-typed: drop (or fill) every field with a
    # type error and check what is left, so that one verdict lists every problem.
    salvaged = _salvage(obj, errors, legacy=legacy, received_at_ms=received_at_ms)
    if salvaged is not None:
        repaired, removed = salvaged
        for problem in _rule_errors(
            repaired, legacy=legacy, now_ms=received_at_ms, max_metadata=max_metadata_entries
        ):
            if not any(_related(problem.path, path) for path in removed):
                errors.append(problem)
    raise SchemaError(_named(early + errors, ancestor))


def _named(errors: list[FieldError], ancestor: AncestorConversion | None) -> list[FieldError]:
    """Errors naming the fields the publisher sent (the ancestor's names it used)."""
    return ancestor.rename_errors(errors) if ancestor is not None else errors


def _convert(
    obj: dict[str, Any], *, legacy: bool, received_at_ms: int
) -> tuple[ParsedSubmission | None, list[FieldError]]:
    if legacy:
        job, errors = convert_or_errors(LegacyJobV1, obj)
        if job is None:
            return None, errors
        return ParsedSubmission(v1_to_v2(job, received_at_ms=received_at_ms), "v1"), []
    spec, errors = convert_or_errors(JobSubmission, obj)
    if spec is None:
        return None, errors
    return ParsedSubmission(spec, "v2"), []


def _rule_errors(
    parsed: ParsedSubmission, *, legacy: bool, now_ms: int, max_metadata: int
) -> list[FieldError]:
    problems = check_submission(parsed.spec, now_ms=now_ms, max_metadata_entries=max_metadata)
    if legacy:  # name the v1 field the publisher sent
        problems = [
            FieldError(path=_V1_PATHS.get(p.path, p.path), reason=p.reason) for p in problems
        ]
    return problems


#: v2 paths that :func:`check_submission` reports -> the v1 field they came from
_V1_PATHS = {"$.job_type": "$.type"}
_STEP = re.compile(
    r'\.(?P<name>[A-Za-z_][A-Za-z0-9_]*)|\[(?P<index>\d+)\]|\[(?P<key>"(?:[^"\\]|\\.)*")\]'
)


def _steps(path: str) -> list[str | int] | None:
    """``$.a.b[0]["c.d"]`` -> ``["a", "b", 0, "c.d"]``; ``None`` if the path is not understood."""
    if not path.startswith("$"):
        return None
    steps: list[str | int] = []
    at = 1
    while at < len(path):
        match = _STEP.match(path, at)
        if match is None:
            return None
        if match.group("name") is not None:
            steps.append(match.group("name"))
        elif match.group("index") is not None:
            steps.append(int(match.group("index")))
        else:
            steps.append(str(json.loads(match.group("key"))))
        at = match.end()
    return steps


def _path_of(steps: list[str | int]) -> str:
    path = "$"
    for step in steps:
        path = f"{path}[{step}]" if isinstance(step, int) else _member_path(path, step)
    return path


def _member_path(path: str, key: str) -> str:
    return f"{path}.{key}" if _NAME.match(key) else f"{path}[{json.dumps(key)}]"


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _salvage(
    obj: dict[str, Any], errors: list[FieldError], *, legacy: bool, received_at_ms: int
) -> tuple[ParsedSubmission, list[str]] | None:
    """Remove the ill-typed members of ``obj`` so the rest converts; return it and what was removed.

    First each error's innermost object member is removed (list items are not: that would shift the
    indexes of the paths reported); if that is not enough, the top-level fields with errors.
    """
    required = "type" if legacy else "job_type"
    for depth in (None, 1):
        repaired = copy.deepcopy(obj)
        removed: list[str] = []
        for error in errors:
            steps = _steps(error.path)
            if not steps:
                return None  # an error on the whole body: nothing to salvage
            cut = next((i for i, s in enumerate(steps) if isinstance(s, int)), len(steps))
            target = steps[: min(cut, depth or cut)]
            if not target or not _remove(repaired, target):
                target = steps[:1]
                _remove(repaired, target)
            removed.append(_path_of(target))
        if not isinstance(repaired.get(required), str):
            repaired[required] = "placeholder"
            removed.append(f"$.{required}")
        parsed, _ = _convert(repaired, legacy=legacy, received_at_ms=received_at_ms)
        if parsed is not None:
            return parsed, removed
    return None


def _remove(obj: dict[str, Any], steps: list[str | int]) -> bool:
    node: Any = obj
    for step in steps[:-1]:
        if isinstance(step, int) or not isinstance(node, dict) or step not in node:
            return False
        node = node[step]
    last = steps[-1]
    if isinstance(last, int) or not isinstance(node, dict):
        return False
    node.pop(last, None)
    return True


#: rule error path -> the other fields that rule reads (see :func:`check_submission`)
_RULE_INPUTS = {
    "$.routing_hints.excluded_runners": ("$.routing_hints.preferred_runners",),
    "$.retry_policy.max_backoff_ms": ("$.retry_policy.initial_backoff_ms",),
}


def _related(path: str, removed: str) -> bool:
    """Whether a rule error at ``path`` may stem from removing ``removed`` (then it is not real)."""
    return any(
        _within(read, removed) or _within(removed, read)
        for read in (path, *_RULE_INPUTS.get(path, ()))
    )


def _within(path: str, outer: str) -> bool:
    return path == outer or path.startswith((outer + ".", outer + "["))


def check_submission(
    spec: JobSubmission, *, now_ms: int, max_metadata_entries: int = MAX_METADATA_ENTRIES
) -> list[FieldError]:
    """Rules the types cannot express; returns every violation."""
    errors: list[FieldError] = []
    if not spec.job_type.strip():
        errors.append(FieldError(path="$.job_type", reason="must not be blank"))
    if spec.deadline_at_ms is not None and spec.deadline_at_ms <= now_ms:
        errors.append(
            FieldError(
                path="$.deadline_at_ms",
                reason=f"deadline {spec.deadline_at_ms} is in the past (now {now_ms})",
            )
        )
    if len(spec.metadata) > max_metadata_entries:
        errors.append(
            FieldError(path="$.metadata", reason=f"at most {max_metadata_entries} entries")
        )
    hints = spec.routing_hints
    if hints is not None:
        both = sorted(set(hints.preferred_runners) & set(hints.excluded_runners))
        if both:
            errors.append(
                FieldError(
                    path="$.routing_hints.excluded_runners",
                    reason=f"runner(s) {', '.join(both)} are both preferred and excluded",
                )
            )
        for i, rule in enumerate(hints.affinity_rules):
            if rule.rule_type != "anti_affinity" and not rule.values:
                errors.append(
                    FieldError(
                        path=f"$.routing_hints.affinity_rules[{i}].values",
                        reason=f"a {rule.rule_type} rule needs at least one value",
                    )
                )
    policy = spec.retry_policy
    if policy is not None and policy.max_backoff_ms < policy.initial_backoff_ms:
        errors.append(
            FieldError(
                path="$.retry_policy.max_backoff_ms",
                reason="must be at least initial_backoff_ms",
            )
        )
    errors.extend(secret_env_errors(spec))
    return errors


def queue_quota_error(
    spec: JobSubmission, queued: int, *, tenant: str, tenant_key: str, limits: LimitsConfig
) -> FieldError | None:
    """Why ``spec`` may not be queued now that its ``tenant`` has ``queued`` jobs waiting, if so.

    The cap is ``limits.tenant_max_queued[tenant]``, else ``limits.max_queued_per_tenant``
    (``None``: no cap).
    """
    cap = limits.tenant_max_queued.get(tenant, limits.max_queued_per_tenant)
    if cap is None or queued < cap:
        return None
    where = (
        f"limits.tenant_max_queued[{tenant!r}]"
        if tenant in limits.tenant_max_queued
        else "limits.max_queued_per_tenant"
    )
    return FieldError(
        path=f"$.metadata.{tenant_key}" if tenant_key in spec.metadata else "$.metadata",
        reason=f"tenant {tenant!r} has {queued} jobs queued, its cap is {cap} ({where}): "
        "submit again once some have started",
    )


def storage_full_error(detail: str) -> FieldError:
    """Why a submission JetStream has no room for was refused (``detail``: the server's words)."""
    return FieldError(
        path="$",
        reason=f"JetStream is full ({detail}): nothing was stored; submit again once jobs "
        "have ended or the limits are raised (docs/operations.md#storage-limits)",
    )


def request_digest(obj: dict[str, Any]) -> str:
    """What makes two submissions "the same": the SHA-256 (hex) of the body's canonical JSON.

    Canonical: object keys sorted at every level, no whitespace, and without the top-level
    ``idempotency_key`` (the HTTP bridge moves the ``Idempotency-Key`` header into the body, so a
    retry with the header is the same as one with the key in the body). Values are compared
    exactly as sent: ``1`` and ``1.0`` differ, and so do a v1 body and its v2 equivalent.

    Secret values do not enter it (their names do): the digest is stored with the job, and a
    hash of a short password is a dictionary attack's oracle. A retry that changes only a
    secret's value is therefore the same submission.
    """
    canonical = {k: v for k, v in obj.items() if k != "idempotency_key"}
    secrets = canonical.get("secret_env")
    if isinstance(secrets, dict):
        canonical["secret_env"] = dict.fromkeys(secrets, REDACTED)
    return hashlib.sha256(_CANONICAL.encode(canonical)).hexdigest()


def token_value(job_id: str, digest: str) -> bytes:
    """The idempotency bucket's value: the first job's id, a space, and its request digest."""
    return f"{job_id} {digest}".encode() if digest else job_id.encode()


def read_token(value: bytes) -> tuple[str, str | None]:
    """``(job id, request digest)`` of an idempotency bucket value.

    The digest is ``None`` for a value stored before digests were kept.
    """
    job_id, _, digest = value.decode(errors="replace").strip().partition(" ")
    return job_id, digest or None


#: what a repeated submission shares with the first one
RepeatedBy = Literal["idempotency_key", "msg_id", "job_id"]


def conflict_error(first_id: str, *, by: RepeatedBy) -> FieldError:
    """The refusal of a body that differs from the first one with the same key, id or job id."""
    path = {
        "idempotency_key": "$.idempotency_key",
        "msg_id": "header.Nats-Msg-Id",
        "job_id": "$.job_id",
    }[by]
    return FieldError(
        path=path,
        reason=f"already used for job {first_id} with a different body: resubmit the same body "
        "to get that job, or use a new value for a different job",
    )


def idempotency_token(spec: JobSubmission, msg_id: str | None) -> str | None:
    """The idempotency bucket key for a submission: its key, else its ``Nats-Msg-Id``, hashed."""
    return token_for(spec.idempotency_key, msg_id)


def token_for(idempotency_key: str | None, msg_id: str | None) -> str | None:
    """The idempotency bucket key for an idempotency key, else a ``Nats-Msg-Id``, hashed."""
    raw = f"key:{idempotency_key}" if idempotency_key else (f"msgid:{msg_id}" if msg_id else None)
    if raw is None:
        return None
    return hashlib.sha256(raw.encode()).hexdigest()


def job_id_for(spec: JobSubmission, *, source: str) -> str:
    """The job id: the client's, or one derived from where the message sits in its stream.

    Deriving it from ``source`` (stream identity + sequence) makes a redelivered message produce the
    same id, which is what makes intake idempotent.
    """
    if spec.job_id:
        return spec.job_id
    return uuid.uuid5(_ID_NAMESPACE, source).hex


def queued_record(
    job_id: str,
    parsed: ParsedSubmission,
    *,
    now_ms: int,
    source_seq: int | None,
    submitted_by: str | None = None,
) -> JobRecord:
    """The record of a newly accepted job (its secret values replaced by ``"***"``).

    ``submitted_by`` is who the subject proves sent it.
    """
    return JobRecord(
        id=job_id,
        state=JobState.QUEUED,
        spec=redact_spec(parsed.spec),
        api_version=parsed.api_version,
        submitted_at_ms=now_ms,
        updated_at_ms=now_ms,
        source_seq=source_seq,
        submitted_by=submitted_by,
        request_sha256=parsed.digest or None,
    )

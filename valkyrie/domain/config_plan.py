"""Planning a runtime config change (pure): the new overrides, the diff, and what is refused.

A revision holds the runtime overrides (dotted keys) that every process layers over its own base
(defaults, profile, file, environment). :func:`plan_change` works out what a
:class:`~schemas.ConfigChange` makes of the overrides in force: which keys change, which are
unknown or cannot change live, and whether the result is a valid config. The config handler
writes the plan as a revision, or refuses it with every reason at once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple, Protocol

from schemas import ConfigChange, FieldError
from valkyrie.config.model import flatten, is_live

__all__ = ["ConfigPlan", "Validation", "Validator", "plan_change"]


class Validation(Protocol):
    """What validating a whole dotted config says (``valkyrie.config.validate.ValidationResult``)."""

    @property
    def config(self) -> object | None:
        """The config when valid, else ``None``."""

    @property
    def errors(self) -> list[FieldError]:
        """Every problem, with dotted paths."""

    @property
    def warnings(self) -> list[FieldError]:
        """Valid but questionable values."""


#: validates a dotted mapping as a whole config (``valkyrie.config.validate.validate_dotted``)
Validator = Callable[[Mapping[str, Any]], Validation]


class ConfigPlan(NamedTuple):
    """The plan: ``new`` overrides (``None``: refused), the diff, errors and warnings."""

    new: dict[str, Any] | None
    diff: dict[str, Any]
    errors: list[FieldError]
    warnings: list[FieldError]


def _requested(
    change: ConfigChange,
    current: Mapping[str, Any],
    base: Mapping[str, Any],
    history: Mapping[int, Mapping[str, Any]],
) -> dict[str, Any] | None:
    """The overrides the change asks for (``None``: a rollback to a revision not in history)."""
    if change.rollback_to is not None:
        if change.rollback_to not in history:
            return None
        return dict(history[change.rollback_to])
    if change.replace is not None:
        return {k: v for k, v in flatten(change.replace).items() if base.get(k) != v}
    new = dict(current)
    for key, value in change.set.items():
        if value is None:
            new.pop(key, None)
        else:
            new[key] = value
    return new


def plan_change(
    change: ConfigChange,
    current: Mapping[str, Any],
    base: Mapping[str, Any],
    history: Mapping[int, Mapping[str, Any]],
    *,
    known_keys: Collection[str],
    validate: Validator,
) -> ConfigPlan:
    """Plan ``change`` against the overrides in force.

    Args:
        change: the request (``set``, ``replace`` or ``rollback_to``).
        current: the runtime overrides in force (dotted).
        base: this process's config below the overrides (dotted).
        history: revision number -> its overrides (only read for a rollback).
        known_keys: every dotted key of the model.
        validate: validates a whole dotted config.
    """
    new = _requested(change, current, base, history)
    if new is None:
        reason = f"no revision {change.rollback_to} in history"
        return ConfigPlan(None, {}, [FieldError(path="rollback_to", reason=reason)], [])
    errors: list[FieldError] = []
    old_effective = {**base, **current}
    new_effective = {**base, **new}
    # an override that is added or changed is checked even when it equals the value here: other
    # processes have other bases (file, environment), and would apply it live
    touched = {k for k, v in new.items() if k not in current or current[k] != v}
    diff: dict[str, Any] = {}
    for key in sorted(set(old_effective) | set(new_effective) | touched):
        before, after = old_effective.get(key), new_effective.get(key)
        if before == after and key not in touched:
            continue
        if key not in known_keys:
            errors.append(FieldError(path=key, reason="unknown key"))
            continue
        live, why = is_live(key)
        if not live:
            errors.append(
                FieldError(
                    path=key,
                    reason=f"cannot change live: {why}; change it in the file or environment and restart",
                )
            )
            continue
        if before != after:
            diff[key] = {"old": before, "new": after}
    if errors:
        # report the values of the other keys too: validate them with the refused keys left alone
        refused = {e.path for e in errors}
        rest = {k: v for k, v in new_effective.items() if k not in refused}
        rest.update({k: old_effective[k] for k in refused if k in old_effective})
        others = validate(rest)
        errors += [e for e in others.errors if e.path not in refused]
        return ConfigPlan(None, diff, errors, others.warnings)
    result = validate(new_effective)
    if result.config is None:
        return ConfigPlan(None, diff, result.errors, result.warnings)
    return ConfigPlan(new, diff, [], result.warnings)

"""Building the effective config from its layers, remembering where every value came from.

Layers, later wins: ``default`` <- ``profile`` <- ``file`` (TOML) <- ``env`` (``VALKYRIE_*``) <-
``runtime`` (revisions in the config KV bucket, applied live).
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from schemas import FieldError
from valkyrie.config.model import PROFILES, ValkyrieConfig, flatten, profile_overrides
from valkyrie.config.settings import Settings
from valkyrie.config.validate import validate_dotted
from valkyrie.errors import ConfigError

__all__ = [
    "LAYERS",
    "LEGACY_ENV",
    "LoadedConfig",
    "config_for",
    "env_layer",
    "file_layer",
    "known_keys",
    "load_config",
]

LAYERS = ("default", "profile", "file", "env", "runtime")

#: The one alias table: flat variable names (``VALKYRIE_ACK_WAIT_S`` …, once process settings)
#: that the ``env`` layer reads as the key they name when its ``VALKYRIE_<SECTION>__<KEY>`` is
#: not set. Bounds and defaults are the key's own (valkyrie/config/model.py).
LEGACY_ENV: dict[str, str] = {
    "ack_wait_s": "performance.ack_wait_s",
    "max_deliver": "performance.max_deliver",
    "handler_concurrency": "performance.handler_concurrency",
    "metrics_port": "observability.metrics_port",
    "metrics_host": "observability.metrics_host",
    "events_max_age_s": "observability.events_max_age_s",
    "submission_max_bytes": "limits.submission_max_bytes",
    "accept_timeout_ms": "dispatch.accept_timeout_ms",
    "runner_lost_after_ms": "dispatch.runner_lost_after_ms",
    "reconcile_interval_ms": "dispatch.reconcile_interval_ms",
    "supervise_interval_ms": "dispatch.supervise_interval_ms",
    "execution_grace_ms": "dispatch.execution_grace_ms",
    "cancel_grace_s": "dispatch.cancel_grace_s",
}
_ENV_PREFIX = "VALKYRIE_"


def known_keys() -> set[str]:
    """Every dotted key of the model."""
    return set(flatten(ValkyrieConfig()))


def _parse_env_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def env_layer(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Dotted overrides from ``VALKYRIE_<SECTION>__<KEY>`` (and the flat legacy names)."""
    env = os.environ if environ is None else environ
    keys = known_keys()
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(_ENV_PREFIX):
            continue
        rest = name[len(_ENV_PREFIX) :].lower()
        key = rest.replace("__", ".")
        if key in keys or "__" in rest:
            # a misspelt VALKYRIE_<SECTION>__<KEY> is kept so that validation refuses it by name
            out[key] = _parse_env_value(raw)
        elif rest in LEGACY_ENV:
            out.setdefault(LEGACY_ENV[rest], _parse_env_value(raw))
    return out


def file_layer(path: Path) -> dict[str, Any]:
    """Dotted values from a TOML file (``[dispatch]`` tables or dotted keys both work).

    Raises:
        ConfigError: the file cannot be read or is not TOML.
    """
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    return flatten(data)


@dataclass(frozen=True)
class LoadedConfig:
    """The effective config, the dotted values of each layer, and each key's source."""

    config: ValkyrieConfig
    layers: dict[str, dict[str, Any]]
    sources: dict[str, str] = field(default_factory=dict)
    warnings: list[FieldError] = field(default_factory=list)

    def base(self) -> dict[str, Any]:
        """Merged dotted values of every layer but ``runtime``."""
        merged: dict[str, Any] = {}
        for layer in LAYERS[:-1]:
            merged.update(self.layers.get(layer, {}))
        return merged

    def with_runtime(self, runtime: Mapping[str, Any]) -> dict[str, Any]:
        """Merged dotted values with ``runtime`` on top."""
        return {**self.base(), **runtime}


def load_config(
    *,
    profile: str | None = None,
    file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    extra_env: Mapping[str, Any] | None = None,
    runtime: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """Build and validate the effective config.

    Raises:
        ConfigError: with every problem (``errors`` attribute) when the result is invalid.
    """
    env = env_layer(environ)
    if extra_env:
        env.update(extra_env)
    file_values = file_layer(file) if file is not None else {}
    chosen = str(env.get("profile") or file_values.get("profile") or profile or "development")
    if chosen not in PROFILES:
        raise ConfigError(f"unknown profile {chosen!r}: choose one of {', '.join(PROFILES)}")
    layers = {
        "default": flatten(ValkyrieConfig()),
        "profile": profile_overrides(chosen),
        "file": file_values,
        "env": env,
        "runtime": dict(runtime or {}),
    }
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in LAYERS:
        for key, value in layers[name].items():
            merged[key] = value
            sources[key] = name
    result = validate_dotted(merged)
    if result.config is None:
        error = ConfigError(
            "invalid configuration: " + "; ".join(f"{e.path}: {e.reason}" for e in result.errors)
        )
        error.errors = result.errors  # type: ignore[attr-defined]
        raise error
    return LoadedConfig(result.config, layers, sources, result.warnings)


def config_for(
    settings: Settings,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """A process's base config, loaded from the layers ``settings`` names.

    The profile and TOML file of ``settings``, then the ``VALKYRIE_*`` environment (``environ``,
    default ``os.environ``), then ``overrides`` (dotted keys, counted as the ``env`` layer: what a
    caller sets in code). A process calls this once at start and hands the result on.

    Raises:
        ConfigError: the file cannot be read, or the result is invalid (every problem listed).
    """
    return load_config(
        profile=settings.profile,
        file=Path(settings.config_file) if settings.config_file else None,
        environ=environ,
        extra_env=overrides,
    )


def encode_toml_value(value: Any) -> str:
    """A value as TOML (for ``config migrate`` output)."""
    return json.dumps(msgspec.to_builtins(value))

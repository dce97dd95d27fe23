"""Configuration: process settings, the runtime config model, its layers, validation, live revisions.

:class:`Settings` says how to reach and provision NATS; every tunable is a key of the runtime model
:class:`ValkyrieConfig`, built from layers (defaults, profile, TOML file, environment, runtime
revisions) by :func:`config_for` and kept current in a process by :class:`LiveConfig`. See
docs/configuration.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from valkyrie._lazy import attach as _attach

if TYPE_CHECKING:
    from valkyrie.config.live import (
        CONFIG_KEY,
        LiveConfig,
    )
    from valkyrie.config.load import (
        LAYERS,
        LEGACY_ENV,
        LoadedConfig,
        config_for,
        env_layer,
        file_layer,
        known_keys,
        load_config,
    )
    from valkyrie.config.migrate import (
        ANCESTOR_FIELDS,
        MigrationReport,
        MigrationStep,
        is_ancestor_document,
        live_only,
        migrate_ancestor,
    )
    from valkyrie.config.model import (
        LIVE_KEYS,
        PROFILES,
        ZERO_ALLOWED,
        DispatchConfig,
        FeatureFlags,
        HealthConfig,
        HttpConfig,
        IntegrationMode,
        LimitsConfig,
        ObservabilityConfig,
        PerformanceConfig,
        SchedulingConfig,
        SecurityConfig,
        TokenConfig,
        ValkyrieConfig,
        flatten,
        is_live,
        profile_overrides,
        unflatten,
    )
    from valkyrie.config.settings import (
        Settings,
        data_dir_of,
        redact_url,
    )
    from valkyrie.config.validate import (
        ValidationResult,
        validate_dotted,
    )

if not TYPE_CHECKING:  # type checkers see the imports above, and no catch-all __getattr__
    __getattr__, __dir__ = _attach(__name__, __file__)

__all__ = [
    "ANCESTOR_FIELDS",
    "CONFIG_KEY",
    "LAYERS",
    "LEGACY_ENV",
    "LIVE_KEYS",
    "PROFILES",
    "ZERO_ALLOWED",
    "DispatchConfig",
    "FeatureFlags",
    "HealthConfig",
    "HttpConfig",
    "IntegrationMode",
    "LimitsConfig",
    "LiveConfig",
    "LoadedConfig",
    "MigrationReport",
    "MigrationStep",
    "ObservabilityConfig",
    "PerformanceConfig",
    "SchedulingConfig",
    "SecurityConfig",
    "Settings",
    "TokenConfig",
    "ValidationResult",
    "ValkyrieConfig",
    "config_for",
    "data_dir_of",
    "env_layer",
    "file_layer",
    "flatten",
    "is_ancestor_document",
    "is_live",
    "known_keys",
    "live_only",
    "load_config",
    "migrate_ancestor",
    "profile_overrides",
    "redact_url",
    "unflatten",
    "validate_dotted",
]

"""TLS to NATS from the ``security`` config section."""

from __future__ import annotations

import ssl

from valkyrie.config.model import SecurityConfig
from valkyrie.errors import ConfigError

__all__ = ["tls_context"]


def tls_context(security: SecurityConfig) -> ssl.SSLContext | None:
    """A client TLS context when ``security.tls_enabled``, else ``None``.

    Raises:
        ConfigError: a certificate, key or CA file cannot be loaded.
    """
    if not security.tls_enabled:
        return None
    try:
        context = ssl.create_default_context(cafile=security.tls_ca_file)
        if security.tls_cert_file:
            context.load_cert_chain(security.tls_cert_file, security.tls_key_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load TLS files from the security section: {e}") from e
    return context

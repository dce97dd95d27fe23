"""Who a connection is: its NATS credentials, its identity and the inbox prefix that goes with it.

A process authenticates with one of: an nkey seed file (``<identity>.nk``, what ``valkyrie auth``
generates), a JWT ``.creds`` file, a user and password, or a token; TLS client certificates come
from the ``security`` config section. The identity names the connection's subjects
(``jobs.submit.<identity>``) and its inbox (``_INBOX_<identity>``), the only inbox its permissions
let it read.

Explicit settings win (``VALKYRIE_NATS_CREDS`` …); otherwise a process on the host of
``valkyrie up`` finds the generated credentials in the data dir (``<data_dir>/auth/creds``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from valkyrie.config.settings import Settings, data_dir_of
from valkyrie.domain.identity import inbox_prefix, valid_identity
from valkyrie.errors import ConfigError

__all__ = ["JWT_MARKER", "Credentials", "auth_dir", "creds_path", "discover"]

#: how a JWT ``.creds`` file starts (an nkey seed file holds only the seed)
JWT_MARKER = "-----BEGIN NATS USER JWT-----"


def auth_dir(settings: Settings) -> Path:
    """Where ``valkyrie auth`` keeps the installation's identities: ``<data_dir>/auth``."""
    return data_dir_of(settings) / "auth"


def creds_path(root: Path, identity: str) -> Path:
    """The nkey seed file of ``identity`` under an auth directory ``root``."""
    return root / "creds" / f"{identity}.nk"


@dataclass(frozen=True)
class Credentials:
    """How one connection authenticates, and as whom.

    Attributes:
        identity: the name its subjects and inbox carry; ``None`` for an open installation.
        nkey_file: an nkey seed file.
        creds_file: a JWT ``.creds`` file (user JWT and seed).
        user: user name (with ``password``).
        password: the user's password.
        token: an authentication token.
    """

    identity: str | None = None
    nkey_file: Path | None = None
    creds_file: Path | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if self.identity is not None and not valid_identity(self.identity):
            raise ConfigError(
                f"identity {self.identity!r} is invalid: use letters, digits, '_' or '-' "
                "(it becomes a subject token)"
            )

    @property
    def authenticated(self) -> bool:
        """Whether the connection presents any credentials."""
        return any((self.nkey_file, self.creds_file, self.user, self.token))

    @property
    def inbox_prefix(self) -> str:
        """``_INBOX_<identity>`` (``_INBOX`` without an identity)."""
        return inbox_prefix(self.identity)

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``.

        Raises:
            ConfigError: a credentials file cannot be read.
        """
        opts: dict[str, Any] = {"inbox_prefix": self.inbox_prefix}
        for path in (self.nkey_file, self.creds_file):
            if path is not None and not path.is_file():
                raise ConfigError(f"NATS credentials file {path} does not exist")
        if self.nkey_file is not None:
            opts["nkeys_seed"] = str(self.nkey_file)
        if self.creds_file is not None:
            opts["user_credentials"] = str(self.creds_file)
        if self.user is not None:
            opts["user"] = self.user
            opts["password"] = self.password or ""
        if self.token is not None:
            opts["token"] = self.token
        return opts

    def describe(self) -> str:
        """How it authenticates, for messages (never a secret)."""
        how = (
            f"nkey {self.nkey_file}"
            if self.nkey_file
            else f"creds {self.creds_file}"
            if self.creds_file
            else f"user {self.user}"
            if self.user
            else "a token"
            if self.token
            else "no credentials"
        )
        return f"{self.identity or 'anonymous'} ({how})"

    @classmethod
    def from_settings(cls, settings: Settings) -> Credentials:
        """The credentials the settings name explicitly (``VALKYRIE_NATS_*``), else none.

        A ``VALKYRIE_NATS_CREDS`` file is a JWT ``.creds`` file when it holds a user JWT, else
        an nkey seed; its name (``runner-r1.nk`` -> ``runner-r1``) is the identity unless
        ``VALKYRIE_NATS_IDENTITY`` says otherwise.
        """
        identity = settings.nats_identity
        nkey = creds = None
        if settings.nats_creds:
            path = Path(settings.nats_creds).expanduser()
            try:
                jwt = JWT_MARKER in path.read_text(errors="replace")
            except OSError as e:
                raise ConfigError(f"cannot read NATS credentials {path}: {e}") from e
            nkey, creds = (None, path) if jwt else (path, None)
            if identity is None and valid_identity(path.stem):
                identity = path.stem
        if identity is None and settings.nats_user and valid_identity(settings.nats_user):
            identity = settings.nats_user
        return cls(
            identity=identity,
            nkey_file=nkey,
            creds_file=creds,
            user=settings.nats_user,
            password=settings.nats_password,
            token=settings.nats_token,
        )


def discover(settings: Settings, identity: str) -> Credentials:
    """The credentials a process speaking as ``identity`` uses.

    Explicit settings first (:meth:`Credentials.from_settings`); else the generated seed of
    ``identity`` in the data dir; else none (an open installation, where ``identity`` only
    names the connection's subjects when ``VALKYRIE_NATS_IDENTITY`` sets it).
    """
    explicit = Credentials.from_settings(settings)
    if explicit.authenticated:
        return explicit
    path = creds_path(auth_dir(settings), identity)
    if path.is_file():
        return Credentials(identity=identity, nkey_file=path)
    return explicit

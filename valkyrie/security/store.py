"""The installation's identities on disk: ``<data_dir>/auth``.

* ``identities.json``: identity -> role, public key, created_at (no secrets);
* ``creds/<identity>.nk``: each identity's nkey seed, the only copy (0600, directory 0700);
* ``nats-server.conf``: the generated accounts and users (public keys and permissions), which
  the embedded server includes and ``valkyrie auth nats-config`` embeds;
* ``jetstream.key``: the JetStream encryption key (0600); ``route.password`` once a cluster
  configuration was generated.

Every file is written to a temporary name and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nkeys

from valkyrie.bus.credentials import creds_path
from valkyrie.bus.names import Names
from valkyrie.domain.identity import (
    RUNNER_PREFIX,
    runner_identity,
    submitter_identity,
    valid_identity,
)
from valkyrie.errors import ConfigError
from valkyrie.security.natsconf import accounts_conf
from valkyrie.security.roles import HANDLER_ROLES, Permissions, role_of

__all__ = [
    "FIXED_IDENTITIES",
    "SYS_IDENTITY",
    "AuthStore",
    "StoredIdentity",
    "new_seed",
    "write_private",
]

#: what ``valkyrie auth init`` creates: the control plane, the gateway, the operator's two
FIXED_IDENTITIES = ("provisioner", *HANDLER_ROLES, "gateway", "admin", "ops")
#: the system account's user (server introspection; not in the Valkyrie account)
SYS_IDENTITY = "sys"
_VERSION = 1


@dataclass(frozen=True)
class StoredIdentity:
    """One identity as ``identities.json`` keeps it."""

    name: str
    role: str
    public_key: str
    created_at: str


def new_seed() -> tuple[bytes, str]:
    """A fresh user nkey: (seed, public key)."""
    seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    pair = nkeys.from_seed(bytearray(seed))
    public = pair.public_key.decode()
    pair.wipe()
    return bytes(seed), public


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600), atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class AuthStore:
    """The identities of one installation under ``root`` (``<data_dir>/auth``)."""

    root: Path

    @property
    def index_file(self) -> Path:
        """``identities.json``."""
        return self.root / "identities.json"

    @property
    def conf_file(self) -> Path:
        """The generated accounts and users (included by the embedded server's config)."""
        return self.root / "nats-server.conf"

    @property
    def key_file(self) -> Path:
        """The JetStream encryption key."""
        return self.root / "jetstream.key"

    @property
    def route_password_file(self) -> Path:
        """The cluster routes' password (created with the first cluster configuration)."""
        return self.root / "route.password"

    def creds(self, identity: str) -> Path:
        """The seed file of ``identity``."""
        return creds_path(self.root, identity)

    def exists(self) -> bool:
        """Whether ``valkyrie auth init`` ran here."""
        return self.index_file.is_file()

    # -- reading ----------------------------------------------------------------------------------
    def _index(self) -> dict[str, object]:
        try:
            raw = json.loads(self.index_file.read_text())
        except FileNotFoundError as e:
            raise ConfigError(
                f"no identities in {self.root}: run `valkyrie auth init` (or `valkyrie up`) first"
            ) from e
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {self.index_file}: {e}") from e
        if not isinstance(raw, dict) or raw.get("version") != _VERSION:
            raise ConfigError(f"{self.index_file} is not a Valkyrie identities file (version 1)")
        return raw

    @property
    def prefix(self) -> str:
        """The subject prefix the permissions were generated for."""
        return str(self._index()["prefix"])

    def identities(self) -> list[StoredIdentity]:
        """Every identity, by name (the system account's ``sys`` included)."""
        entries = self._index().get("identities")
        assert isinstance(entries, dict)
        return [
            StoredIdentity(
                name=name,
                role=str(e["role"]),
                public_key=str(e["public_key"]),
                created_at=str(e["created_at"]),
            )
            for name, e in sorted(entries.items())
        ]

    def get(self, identity: str) -> StoredIdentity | None:
        """One identity, or ``None``."""
        return next((i for i in self.identities() if i.name == identity), None)

    def jetstream_key(self) -> str:
        """The JetStream encryption key."""
        try:
            return self.key_file.read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the JetStream key {self.key_file}: {e}") from e

    def route_password(self) -> str:
        """The cluster routes' password, created on first use."""
        if not self.route_password_file.is_file():
            write_private(self.route_password_file, secrets.token_urlsafe(32).encode())
        return self.route_password_file.read_text().strip()

    def accounts(self, extra_users: Mapping[str, Permissions] | None = None) -> str:
        """The accounts configuration for the identities as they are now.

        ``extra_users`` (public nkey -> permissions) are users the role table does not know.
        """
        users = {i.name: i.public_key for i in self.identities() if i.name != SYS_IDENTITY}
        system = self.get(SYS_IDENTITY)
        return accounts_conf(
            users,
            Names(self.prefix),
            system_user=system.public_key if system else None,
            extra_users=extra_users,
        )

    # -- changing -----------------------------------------------------------------------------------
    def init(self, prefix: str) -> list[str]:
        """Create the fixed identities, the JetStream key and the server config.

        Idempotent: what exists is kept (seeds are never replaced here). Returns the identities
        created now.

        Raises:
            ConfigError: the identities were made for another prefix.
        """
        Names(prefix)  # validates it
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if self.exists() and self.prefix != prefix:
            raise ConfigError(
                f"the identities in {self.root} were made for subject prefix {self.prefix!r}, "
                f"not {prefix!r}: use that prefix, or another data dir"
            )
        if not self.key_file.is_file():
            write_private(self.key_file, secrets.token_hex(32).encode())
        with self._editing(prefix) as entries:
            created = [i for i in (*FIXED_IDENTITIES, SYS_IDENTITY) if i not in entries]
            for identity in created:
                entries[identity] = self._issue(identity, role="sys" if identity == "sys" else None)
        return created

    def add_runner(self, runner_id: str) -> Path:
        """Issue runner ``runner_id``'s identity (a new seed if it exists: rotation)."""
        return self._add(runner_identity(runner_id))

    def add_submitter(self, name: str) -> Path:
        """Issue submitter ``name``'s identity (a new seed if it exists: rotation)."""
        return self._add(submitter_identity(name))

    def rotate(self, identity: str) -> Path:
        """Give ``identity`` a new seed; the old one stops working at the next reload."""
        if self.get(identity) is None:
            raise ConfigError(f"no identity {identity!r} (see `valkyrie auth ls`)")
        return self._add(identity)

    def _add(self, identity: str) -> Path:
        if not valid_identity(identity):
            raise ConfigError(
                f"{identity!r} cannot be an identity: use letters, digits, '_' or '-' (at most 128)"
            )
        with self._editing(self.prefix) as entries:
            entries[identity] = self._issue(identity)
        return self.creds(identity)

    def revoke(self, identity: str) -> None:
        """Remove ``identity``: its user leaves the server config and its seed is deleted.

        Raises:
            ConfigError: no such identity, or one the control plane cannot do without.
        """
        if identity in (*FIXED_IDENTITIES, SYS_IDENTITY):
            raise ConfigError(
                f"{identity!r} is one of the control plane's own identities: rotate it "
                f"(`valkyrie auth rotate {identity}`) instead of revoking it"
            )
        with self._editing(self.prefix) as entries:
            if entries.pop(identity, None) is None:
                raise ConfigError(f"no identity {identity!r} (see `valkyrie auth ls`)")
        self.creds(identity).unlink(missing_ok=True)

    def runner_ids(self) -> list[str]:
        """The runners that have an identity."""
        return [i.name.removeprefix(RUNNER_PREFIX) for i in self.identities() if i.role == "runner"]

    def _issue(self, identity: str, *, role: str | None = None) -> dict[str, str]:
        seed, public = new_seed()
        write_private(self.creds(identity), seed + b"\n")
        return {
            "role": role or role_of(identity),
            "public_key": public,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }

    @contextmanager
    def _editing(self, prefix: str) -> Iterator[dict[str, dict[str, str]]]:
        """Change the identities, then write the index and the server config."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # one writer at a time: `valkyrie auth runner` may run while `valkyrie up` initialises
        fd = os.open(self.root / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entries: dict[str, dict[str, str]] = {}
            if self.exists():
                current = self._index().get("identities")
                assert isinstance(current, dict)
                entries = {k: dict(v) for k, v in current.items()}
            yield entries
            index = {"version": _VERSION, "prefix": prefix, "identities": entries}
            write_private(self.index_file, (json.dumps(index, indent=2) + "\n").encode())
            write_private(self.conf_file, self.accounts().encode())
        finally:
            os.close(fd)

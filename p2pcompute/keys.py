"""Key files on disk: create (mode 0600, never silently overwritten), read (refuse unsafe or damaged files).

The file holds the 68-byte libp2p protobuf ``PrivateKey`` encoding of an Ed25519 key (the format
go-libp2p uses), see :meth:`p2pcompute.core.identity.KeyPair.private_key_bytes`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import platformdirs

from p2pcompute.core.identity import SEED_SIZE, KeyPair
from p2pcompute.errors import KeyFileError, Reason

__all__ = [
    "KEY_FILE_NAME",
    "default_data_dir",
    "default_key_path",
    "generate_keypair",
    "load_or_create_key",
    "read_key_file",
    "write_key_file",
]

KEY_FILE_NAME = "identity.key"
_MAX_KEY_FILE_SIZE = 4096
DATA_DIR_ENV = "P2PCOMPUTE_HOME"


def default_data_dir() -> Path:
    """``$P2PCOMPUTE_HOME`` if set, else the platform's per-user data directory."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path(platformdirs.user_data_dir("p2pcompute", appauthor=False))


def default_key_path(data_dir: Path | None = None) -> Path:
    return (data_dir or default_data_dir()) / KEY_FILE_NAME


def generate_keypair() -> KeyPair:
    """A new key pair from the operating system's CSPRNG."""
    return KeyPair.from_seed(os.urandom(SEED_SIZE))


def write_key_file(path: Path, keypair: KeyPair, *, force: bool = False) -> None:
    """Write ``keypair`` to ``path`` with mode 0600 (directory created with 0700).

    Refuses to replace an existing file unless ``force``; a forced write is atomic (temp + rename).
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = keypair.private_key_bytes()
    if not force:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise KeyFileError(
                Reason.KEY_FILE_EXISTS,
                f"{path} already exists; pass --force to replace it (the old identity is lost)",
            ) from exc
        _write_all(fd, data)
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    _write_all(fd, data)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _write_all(fd: int, data: bytes) -> None:
    try:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_key_file(path: Path) -> KeyPair:
    """Read a key file, refusing missing, group/world-accessible, truncated, corrupt or non-Ed25519 files."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise KeyFileError(
            Reason.KEY_FILE_MISSING, f"{path} does not exist; create one with `p2pcompute keys new`"
        ) from exc
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(Reason.KEY_FILE_WRONG_TYPE, f"{path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            Reason.KEY_FILE_PERMISSIONS,
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; a private key must not be readable by group or "
            f"others: run `chmod 600 {path}`",
        )
    with open(path, "rb") as f:
        data = f.read(_MAX_KEY_FILE_SIZE + 1)
    if not data:
        raise KeyFileError(Reason.KEY_FILE_TRUNCATED, f"{path} is empty")
    if len(data) > _MAX_KEY_FILE_SIZE:
        raise KeyFileError(Reason.KEY_FILE_WRONG_TYPE, f"{path} is far too large to be a key file")
    try:
        return KeyPair.from_private_key_bytes(data)
    except KeyFileError as exc:
        raise KeyFileError(exc.reason, f"{path}: {exc.detail}") from exc


def load_or_create_key(path: Path) -> tuple[KeyPair, bool]:
    """Read the key at ``path``, or create it if there is none. Returns (key pair, created)."""
    if not path.exists():
        keypair = generate_keypair()
        try:
            write_key_file(path, keypair)
        except KeyFileError as exc:
            if exc.reason is not Reason.KEY_FILE_EXISTS:  # lost a race with another process: read theirs
                raise
        else:
            return keypair, True
    return read_key_file(path), False

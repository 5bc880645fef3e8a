"""Key files: mode 0600, never overwritten silently, unsafe or damaged files refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from p2pcompute.core.identity import KeyPair
from p2pcompute.errors import KeyFileError, Reason
from p2pcompute.keys import generate_keypair, load_or_create_key, read_key_file, write_key_file


def test_write_then_read(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "identity.key"
    pair = generate_keypair()
    write_key_file(path, pair)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_key_file(path).peer_id == pair.peer_id


def test_generated_keys_differ() -> None:
    assert generate_keypair().peer_id != generate_keypair().peer_id


def test_existing_file_not_overwritten_without_force(tmp_path: Path) -> None:
    path = tmp_path / "k"
    first = generate_keypair()
    write_key_file(path, first)
    with pytest.raises(KeyFileError) as info:
        write_key_file(path, generate_keypair())
    assert info.value.reason is Reason.KEY_FILE_EXISTS
    assert read_key_file(path).peer_id == first.peer_id
    second = generate_keypair()
    write_key_file(path, second, force=True)
    assert read_key_file(path).peer_id == second.peer_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no temp file left behind


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666])
def test_group_or_world_accessible_file_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k"
    write_key_file(path, generate_keypair())
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as info:
        read_key_file(path)
    assert info.value.reason is Reason.KEY_FILE_PERMISSIONS
    assert "chmod 600" in str(info.value)


def _raw_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "k"
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.KEY_FILE_TRUNCATED),
        (KeyPair.from_seed(b"\x01" * 32).private_key_bytes()[:50], Reason.KEY_FILE_TRUNCATED),
        (b"\x08\x00\x12\x40" + b"\x00" * 64, Reason.KEY_FILE_WRONG_TYPE),
        (b"hello, I am a text file\n", Reason.KEY_FILE_WRONG_TYPE),
        (b"\x08\x01" + b"\x00" * 5000, Reason.KEY_FILE_WRONG_TYPE),
        (KeyPair.from_seed(b"\x01" * 32).private_key_bytes()[:-1] + b"\x00", Reason.KEY_FILE_CORRUPT),
    ],
)
def test_damaged_files_refused(tmp_path: Path, data: bytes, reason: Reason) -> None:
    with pytest.raises(KeyFileError) as info:
        read_key_file(_raw_file(tmp_path, data))
    assert info.value.reason is reason


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as info:
        read_key_file(tmp_path / "nope")
    assert info.value.reason is Reason.KEY_FILE_MISSING
    with pytest.raises(KeyFileError) as info:
        read_key_file(tmp_path)
    assert info.value.reason is Reason.KEY_FILE_WRONG_TYPE


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "data" / "identity.key"
    pair, created = load_or_create_key(path)
    assert created
    again, created_again = load_or_create_key(path)
    assert not created_again
    assert again.peer_id == pair.peer_id

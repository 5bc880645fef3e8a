"""Node configuration: TOML file, command-line overrides, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pcompute.config import load_config, parse_price
from p2pcompute.errors import ConfigError

BOOT = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB"


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PCOMPUTE_HOME", str(tmp_path))
    config = load_config()
    assert config.data_dir == tmp_path
    assert config.listen == ("/ip4/0.0.0.0/tcp/4001",)
    assert config.key_path == tmp_path / "identity.key"


def test_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        f'data_dir = "{tmp_path}"\nlisten = ["/ip4/127.0.0.1/tcp/5000"]\nbootstrap = ["{BOOT}"]\n'
        'price = 0.25\nslots = 3\nadvertise_interval = 5\nlog_level = "DEBUG"\n'
    )
    config = load_config(path, {"slots": 4, "listen": None, "price": None})
    assert config.listen == ("/ip4/127.0.0.1/tcp/5000",)
    assert config.bootstrap == (BOOT,)
    assert config.price_per_second == 250_000
    assert config.slots == 4
    assert config.advertise_interval == 5.0
    assert config.log_level == "debug"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slots = 0", "slots"),
        ('slots = "two"', "integer"),
        ("nonsense = 1", "unknown key"),
        ('bootstrap = ["/ip4/1.2.3.4/tcp/1"]', "/p2p/"),
        ('bootstrap = ["/ip4/1.2.3.4/p2p/12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB/tcp/1"]', "/p2p/"),
        ('listen = ["127.0.0.1:4001"]', "multiaddr"),
        ("price = -1", "price"),
        ('price = "abc"', "not a number"),
        ("price = 0.0000001", "6 decimal"),
        ("advertise_interval = 700\nadvert_ttl = 600", "advert_ttl"),
        ('log_level = "loud"', "log_level"),
        ("mdns = 1", "true or false"),
        ("slots = [", "node.toml"),
        ('announce = ["/ip4/0.0.0.0/tcp/4001"]', "concrete"),
        (
            'announce = ["/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB"]',
            "announce",
        ),
        ('announce = ["/ip4/203.0.113.7/udp/4001"]', "announce"),
        ('announce = ["/ip4/203.0.113.7/tcp/70000"]', "port"),
        ('announce = ["/ip6/203.0.113.7/tcp/4001"]', "ip6"),
    ],
)
def test_bad_values_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_parse_price() -> None:
    assert parse_price("0.002") == 2000
    assert parse_price(1) == 1_000_000
    assert parse_price("0") == 0


def test_announce_addresses_from_file_and_flag(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('announce = ["/ip4/203.0.113.7/tcp/4001", "/dns4/gpu.example.org/tcp/4001"]\n')
    config = load_config(path)
    assert config.announce == ("/ip4/203.0.113.7/tcp/4001", "/dns4/gpu.example.org/tcp/4001")
    assert load_config(path, {"announce": ("/ip6/2001:db8::7/tcp/4001",)}).announce == ("/ip6/2001:db8::7/tcp/4001",)

"""p2pcompute.core.reach: the reachability decision table and relay choice."""

from __future__ import annotations

import pytest

from p2pcompute.core.reach import (
    NatMode,
    Reachability,
    ReachPolicy,
    ReachState,
    RelayCandidate,
    Verdict,
    circuit_address,
)
from p2pcompute.errors import ConfigError

HOUR = 3_600_000


def v(server: str, reachable: bool, group: str | None = None, at: int = 0) -> Verdict:
    return Verdict(server, group or f"ip4:10.0.0.{server}", reachable, at)


def test_no_verdicts_is_unknown_and_wants_relays() -> None:
    state = ReachState()
    assert state.status(0) is Reachability.UNKNOWN
    assert state.wants_relays(0)


def test_one_server_never_decides() -> None:
    state = ReachState(policy=ReachPolicy(confirmations=2))
    state.record(v("1", True))
    assert state.status(0) is Reachability.UNKNOWN


def test_two_groups_agreeing_decide_and_a_public_node_holds_no_relay() -> None:
    state = ReachState()
    state.record(v("1", True))
    state.record(v("2", True))
    assert state.status(0) is Reachability.PUBLIC
    assert state.relays_to_reserve(0, [RelayCandidate("r", "/ip4/1.2.3.4/tcp/1/p2p/r")], held=[]) == []


def test_servers_in_one_address_group_count_once() -> None:
    """Many peer ids behind one /16 (one operator) cannot talk a node into "public"."""
    state = ReachState()
    for i in range(10):
        state.record(v(str(i), True, group="ip4:203.0.0.0/16"))
    assert state.status(0) is Reachability.UNKNOWN


def test_each_server_counts_once_with_its_newest_verdict() -> None:
    state = ReachState()
    state.record(v("1", True))
    state.record(v("2", True))
    state.record(v("2", False))
    assert state.status(0) is Reachability.UNKNOWN
    state.record(v("3", False))
    assert state.status(0) is Reachability.PRIVATE


def test_verdicts_expire() -> None:
    state = ReachState(policy=ReachPolicy(verdict_ttl_ms=HOUR))
    state.record(v("1", False, at=0))
    state.record(v("2", False, at=0))
    assert state.status(HOUR) is Reachability.PRIVATE
    assert state.status(HOUR + 1) is Reachability.UNKNOWN


def test_forced_modes_ignore_verdicts() -> None:
    public = ReachState(NatMode.PUBLIC)
    public.record(v("1", False))
    public.record(v("2", False))
    assert public.status(0) is Reachability.PUBLIC
    private = ReachState(NatMode.PRIVATE)
    assert private.status(0) is Reachability.PRIVATE


def test_memory_is_bounded() -> None:
    state = ReachState(policy=ReachPolicy(max_verdicts=4))
    for i in range(100):
        state.record(v(str(i), True))
    assert len(state.verdicts(0)) == 4


def test_relays_configured_first_then_others_skipping_held_and_failed() -> None:
    state = ReachState(NatMode.PRIVATE, ReachPolicy(max_relays=2))
    found = [RelayCandidate(p, f"/ip4/10.0.0.1/tcp/1/p2p/{p}") for p in ("a", "b", "c")]
    mine = RelayCandidate("m", "/ip4/10.0.0.9/tcp/1/p2p/m", configured=True)
    assert [c.peer for c in state.relays_to_reserve(0, [*found, mine], held=[])] == ["m", "a"]
    assert [c.peer for c in state.relays_to_reserve(0, [*found, mine], held=["m"], failed=["a"])] == ["b"]
    assert state.relays_to_reserve(0, [*found, mine], held=["m", "b"]) == []


def test_circuit_address() -> None:
    assert circuit_address("/ip4/1.2.3.4/tcp/9/p2p/R", "R", "W") == "/ip4/1.2.3.4/tcp/9/p2p/R/p2p-circuit/p2p/W"
    with pytest.raises(ConfigError):
        circuit_address("/ip4/1.2.3.4/tcp/9/p2p/R/p2p-circuit/p2p/X", "R", "W")


def test_policy_bounds() -> None:
    with pytest.raises(ConfigError):
        ReachPolicy(confirmations=0)
    with pytest.raises(ConfigError):
        ReachPolicy(max_relays=0)


def test_liars_saying_reachable_never_outvote_an_honest_failure() -> None:
    """A false "public" costs every job (no relay); a false "private" costs one slot: a single failure keeps a node
    off public, however many servers in however many groups say it is reachable."""
    state = ReachState()
    for i in range(5):
        state.record(v(str(i), True))
    state.record(v("honest", False))
    assert state.status(0) is Reachability.UNKNOWN
    assert state.wants_relays(0)
    state.record(v("honest2", False))
    assert state.status(0) is not Reachability.PUBLIC


def test_discovered_relays_of_one_address_group_take_one_slot() -> None:
    state = ReachState(NatMode.PRIVATE, ReachPolicy(max_relays=2))
    same = [
        RelayCandidate(p, f"/ip4/203.0.113.{i}/tcp/1/p2p/{p}", group="ip4:203.0.0.0/16") for i, p in enumerate("ab")
    ]
    other = RelayCandidate("c", "/ip4/198.51.100.1/tcp/1/p2p/c", group="ip4:198.51.0.0/16")
    assert [c.peer for c in state.relays_to_reserve(0, [*same, other], held=[])] == ["a", "c"]
    assert state.relays_to_reserve(0, same, held=["a"], held_groups=["ip4:203.0.0.0/16"]) == []

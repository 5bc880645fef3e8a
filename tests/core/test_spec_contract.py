"""The specs are the contract: their tables, parsed mechanically, must say exactly what the code does.

An implementation written from ``specs/`` alone has to agree with this one on every field, bound, registered
message type, reason code and default. So this module reads the tables the specs state them in and compares each
with the code:

- every schema table (``<!-- schema: Name -->`` followed by ``| Field | Type | Bounds | Meaning |``, in the notation
  of ``00-conventions.md`` §5.6) against the compiled schema of that struct or message, field by field and in order;
- every wire struct of ``p2pcompute/core`` has exactly one such table (the job format's own structs excepted);
- the registry table of ``00-conventions.md`` §6 against ``messages.DEFAULT_REGISTRY``;
- the reason-code table of ``00-conventions.md`` §10 against ``errors.Reason``, and against the exception class of
  every ``SomeError(Reason.X, ...)`` the package raises;
- the reason tables of the other specs, and the decline reasons, against the enums;
- the parameter tables against the defaults in the code.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import pkgutil
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

import p2pcompute
import p2pcompute.core
from p2pcompute import errors
from p2pcompute.config import NodeConfig
from p2pcompute.core import codec, identity, replay
from p2pcompute.core.adverts import AdvertPolicy
from p2pcompute.core.envelope import MAX_ENVELOPE_SIZE, MAX_PAYLOAD_SIZE
from p2pcompute.core.ledger import DEFAULT_RECEIPT_GRACE_MS, LedgerRole, entry_hash, entry_signing_bytes
from p2pcompute.core.messages import DEFAULT_REGISTRY, DeclineReason, Message
from p2pcompute.core.negotiation import MAX_SIGNED_SIZE, MAX_SPEC_SIZE, NegotiationPolicy
from p2pcompute.core.reach import ReachPolicy
from p2pcompute.core.reputation import ReputationPolicy
from p2pcompute.core.schema import (
    I64_MIN,
    U32_MAX,
    U64_MAX,
    FieldType,
    Struct,
    TBool,
    TBytes,
    TEnum,
    TFloat,
    TInt,
    TOptional,
    TPeerId,
    TStr,
    TStruct,
    TTuple,
    fields_of,
)
from p2pcompute.core.tensors import DTYPES
from p2pcompute.core.verification import DEFAULT_EVIDENCE_TTL_MS, MAX_EVIDENCE_SIZE, EvidenceInbox, QuorumPolicy
from p2pcompute.errors import P2PComputeError, Reason
from p2pcompute.net import holepunch, reach, relay

SPECS = Path(__file__).resolve().parents[2] / "specs"
PACKAGE = Path(p2pcompute.__file__).resolve().parent

# Specs whose schema tables are parsed here. job-format.md and data-channel.md state their structs in a notation of
# their own (owned with the job format and the data channel); their structs are listed in NOT_HERE below.
SCHEMA_SPECS = (
    "00-conventions.md",
    "identity-and-envelopes.md",
    "adverts.md",
    "negotiation.md",
    "verification.md",
    "ledger.md",
    "discovery.md",
)
NOT_HERE = {
    "TensorMeta": "job-format.md §2 (its dtype table is checked by test_job_format_dtype_table_is_the_code_s)",
}
NOT_HERE_MODULES = {"p2pcompute.core.jobspec": "job-format.md"}

HEADER_FIELDS = ("version", "id", "nonce", "expires_at")
_SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")
MINUS = "\u2212"  # the specs write negative numbers, and 2 to a power minus 1, with U+2212
_NUM = MINUS + "?(?:2[⁰¹²³⁴⁵⁶⁷⁸⁹]+(?:" + MINUS + r"1)?|10[⁰¹²³⁴⁵⁶⁷⁸⁹]+|\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)"


# --- reading markdown tables -------------------------------------------------------------------------------------


def _cells(line: str) -> list[str]:
    """The cells of one table row; ``\\|`` is a literal bar inside a cell."""
    inner = line.strip()
    assert inner.startswith("|") and inner.endswith("|"), line
    parts = re.split(r"(?<!\\)\|", inner[1:-1])
    return [part.replace("\\|", "|").strip() for part in parts]


@dataclass(frozen=True)
class Table:
    path: str
    line: int  # 1-based line of the header row
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    marker: str | None  # the name of a preceding <!-- schema: Name --> marker


@cache
def tables(name: str) -> tuple[Table, ...]:
    lines = (SPECS / name).read_text(encoding="utf-8").splitlines()
    out: list[Table] = []
    marker: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        found = re.fullmatch(r"<!-- schema: (\w+) -->", line.strip())
        if found:
            marker = found.group(1)
            i += 1
            continue
        if line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            header = tuple(_cells(line))
            rows: list[tuple[str, ...]] = []
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append(tuple(_cells(lines[j])))
                j += 1
            out.append(Table(name, i + 1, header, tuple(rows), marker))
            marker = None
            i = j
            continue
        if line.strip():
            marker = None  # a marker names the table right after it
        i += 1
    return tuple(out)


def _plain(cell: str) -> str:
    return cell.replace("`", "").strip()


def _names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# --- the schema notation of 00-conventions.md §5.6 ---------------------------------------------------------------


def number(text: str) -> int | float:
    t = text.strip().replace(",", "")
    sign = -1 if t.startswith(MINUS) else 1
    t = t.lstrip(MINUS)
    power = re.fullmatch(rf"(2|10)([⁰¹²³⁴⁵⁶⁷⁸⁹]+)({MINUS}1)?", t)
    if power:
        value = int(power.group(1)) ** int(power.group(2).translate(_SUPERSCRIPT)) - (1 if power.group(3) else 0)
        return sign * value
    return sign * (float(t) if "." in t else int(t))


Desc = tuple[Any, ...]


def describe(ft: FieldType) -> Desc:
    """A compiled field type as a comparable tuple."""
    match ft:
        case TInt(lo=lo, hi=hi):
            return ("int", lo, hi)
        case TFloat(lo=lo, hi=hi):
            return ("float", lo, hi)
        case TBool():
            return ("bool",)
        case TStr(lo=lo, hi=hi, names=names):
            return ("str", lo, hi, names)
        case TBytes(lo=lo, hi=hi):
            return ("bytes", lo, hi)
        case TPeerId():
            return ("PeerId",)
        case TEnum(cls=cls):
            return ("enum", frozenset(str(member.value) for member in cls))
        case TOptional(inner=inner):
            return ("nil|", describe(inner))
        case TTuple(item=item, lo=lo, hi=hi):
            return ("array", describe(item), lo, hi)
        case TStruct(cls=cls):
            return ("struct", cls.__name__)
    raise AssertionError(ft)


_DEFAULTS = {"int": (I64_MIN, U64_MAX), "float": (float("-inf"), float("inf")), "str": (0, 4096), "bytes": (0, 1 << 20)}


def _range(bounds: str, unit: str = "") -> tuple[int | float, int | float] | None:
    """``lo … hi`` or (with a unit) ``n <unit>``; None for an empty cell."""
    if not bounds:
        return None
    suffix = rf"\s+{unit}" if unit else ""
    both = re.fullmatch(rf"({_NUM}) … ({_NUM}){suffix}", bounds)
    if both:
        return number(both.group(1)), number(both.group(2))
    if unit:
        one = re.fullmatch(rf"({_NUM}){suffix}", bounds)
        if one:
            return number(one.group(1)), number(one.group(1))
    raise ValueError(f"bounds {bounds!r} are not in the notation of 00-conventions.md §5.6")


def parse_type(type_cell: str, bounds: str) -> Desc:
    """A Type cell and the canonical part of its Bounds cell (before any ``;``) as a comparable tuple."""
    t = _plain(type_cell)
    b = bounds.strip()
    if t.endswith(" | nil"):
        return ("nil|", parse_type(t.removesuffix(" | nil"), b))
    array = re.fullmatch(r"array<(.+)>", t)
    if array:
        found = re.fullmatch(rf"({_NUM}) … ({_NUM}) items(?:, each (.+))?", b)
        if not found:
            raise ValueError(f"array bounds {b!r} are not `lo … hi items[, each ...]`")
        return (
            "array",
            parse_type(array.group(1), found.group(3) or ""),
            number(found.group(1)),
            number(found.group(2)),
        )
    if t in ("u32", "u64"):
        if b and not re.fullmatch(rf"= {_NUM}", b):
            raise ValueError(f"{t} takes no bounds (or `= N` for the header's version), got {b!r}")
        return ("int", 0, U32_MAX if t == "u32" else U64_MAX)
    if t in ("int", "float"):
        lo, hi = _range(b) or _DEFAULTS[t]
        return (t, int(lo), int(hi)) if t == "int" else (t, float(lo), float(hi))
    if t in ("str", "bytes"):
        size, _, names = b.partition(", one of ")
        lo, hi = _range(size, "bytes") or _DEFAULTS[t]
        if t == "bytes":
            assert not names, b
            return ("bytes", lo, hi)
        return ("str", lo, hi, frozenset(_names(names)) if names else None)
    if t in ("bool", "PeerId"):
        assert not b, f"{t} takes no bounds, got {b!r}"
        return (t,)
    if t == "enum":
        values = re.findall(r'"([^"]*)"', b)
        assert values, f"an enum lists its values, got {b!r}"
        return ("enum", frozenset(values))
    if re.fullmatch(r"[A-Z]\w*", t):
        assert not b, f"a struct takes no bounds, got {b!r}"
        return ("struct", t)
    raise ValueError(f"type {t!r} is not in the notation of 00-conventions.md §5.6")


# --- which structs exist, and where the specs give them ----------------------------------------------------------


def core_structs() -> dict[str, type[Struct]]:
    for info in pkgutil.iter_modules(p2pcompute.core.__path__, "p2pcompute.core."):
        importlib.import_module(info.name)
    found: dict[str, type[Struct]] = {}
    stack: list[type[Struct]] = [Struct]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            stack.append(sub)
            if sub.__module__.startswith("p2pcompute.core.") and sub.__module__ not in NOT_HERE_MODULES:
                found[sub.__name__] = sub
    return found


@cache
def schema_tables() -> dict[str, Table]:
    out: dict[str, Table] = {}
    for name in SCHEMA_SPECS:
        for table in tables(name):
            if table.marker is None:
                continue
            assert table.marker not in out, f"{table.marker} has two schema tables ({out[table.marker].path}, {name})"
            assert table.header == ("Field", "Type", "Bounds", "Meaning"), f"{name}:{table.line}: {table.header}"
            out[table.marker] = table
    return out


def test_every_wire_struct_of_the_core_has_one_schema_table() -> None:
    structs = core_structs()
    marked = set(schema_tables())
    missing = set(structs) - marked - set(NOT_HERE)
    assert not missing, f"structs without a schema table in specs/: {sorted(missing)}"
    unknown = marked - set(structs)
    assert not unknown, f"schema tables naming no struct of p2pcompute/core: {sorted(unknown)}"
    assert {"Message", "GpuAdvert", "JobResult", "CheatingEvidence", "TicketFrame", "Envelope"} <= marked


def _expected_rows(cls: type[Struct], table: Table) -> list[tuple[str, str, str]]:
    """(field, type, bounds) rows of ``table``, the common-header shorthand expanded."""
    rows: list[tuple[str, str, str]] = []
    for field, type_cell, bounds, _meaning in table.rows:
        names = _names(field)
        if names == list(HEADER_FIELDS):
            assert issubclass(cls, Message), f"{cls.__name__}: only messages have the common header"
            header = schema_tables()["Message"]
            rows.extend((_plain(r[0]), r[1], r[2]) for r in header.rows)
            continue
        assert len(names) == 1, f"{table.path}:{table.line}: a field cell names one field, got {field!r}"
        rows.append((names[0], type_cell, bounds))
    return rows


@pytest.mark.parametrize("name", sorted(schema_tables()))
def test_schema_table_is_the_code_s_schema(name: str) -> None:
    cls = core_structs()[name]
    table = schema_tables()[name]
    rows = _expected_rows(cls, table)
    kind = getattr(cls, "KIND", None)
    if kind is not None:  # a negotiation frame: its `kind` row names the tag
        assert rows[0][0] == "kind" and _plain(rows[0][1]) == "str", f"{name}: the first row is `kind`"
        assert re.findall(r'"([^"]*)"', rows[0][2]) == [kind.value], f"{name}: kind is {kind.value!r}"
        rows = rows[1:]
    code = fields_of(cls)
    assert [r[0] for r in rows] == [f for f, _ in code], f"{table.path}:{table.line}: {name}'s fields or their order"
    for (field, type_cell, bounds), (_, ft) in zip(rows, code, strict=True):
        canonical, _, _note = bounds.partition(";")
        assert parse_type(type_cell, canonical) == describe(ft), (
            f"{table.path}:{table.line}: {name}.{field} is `{type_cell}` `{bounds}` in the spec, {ft} in the code"
        )
        if field == "version" and issubclass(cls, Message):
            pinned = re.match(rf"= ({_NUM})", canonical.strip())
            assert pinned and number(pinned.group(1)) == cls.VERSION, f"{name}.version must be `= {cls.VERSION}`"


def test_the_notation_parser_reads_what_the_conventions_say() -> None:
    assert parse_type("`array<str>`", "1 … 16 items, each 1 … 256 bytes") == (
        "array",
        ("str", 1, 256, None),
        1,
        16,
    )
    assert parse_type("`int`", f"1 … 2³²{MINUS}1") == ("int", 1, U32_MAX)
    assert parse_type("`int`", "0 … 2⁴⁰") == ("int", 0, 1 << 40)
    assert parse_type("`bytes \\| nil`".replace("\\|", "|"), "32 bytes") == ("nil|", ("bytes", 32, 32))
    assert parse_type("`str`", "1 … 16 bytes, one of `float32`, `int8`") == (
        "str",
        1,
        16,
        frozenset({"float32", "int8"}),
    )
    assert parse_type("`float`", "0 … 100,000") == ("float", 0.0, 100_000.0)
    assert parse_type("`str`", "") == ("str", 0, 4096, None)
    with pytest.raises(ValueError):
        parse_type("`int`", "≥ 1")  # how adverts.md r0 stated Device.cores: no upper bound
    with pytest.raises(ValueError):
        parse_type("`u8`", "")


# --- the registry (00-conventions.md §6) ---------------------------------------------------------------------------


def _registry_table() -> Table:
    [table] = [t for t in tables("00-conventions.md") if t.header[:2] == ("Payload type", "Signing domain")]
    return table


def test_registry_table_lists_every_registered_type_exactly() -> None:
    table = _registry_table()
    assert table.header == (
        "Payload type",
        "Signing domain",
        "Version",
        "Signer field",
        "Fields after the header",
        "Spec",
    )
    listed = {_plain(row[0]): row for row in table.rows}
    assert set(listed) == set(DEFAULT_REGISTRY), "00-conventions.md §6 must list every registered type"
    assert len(listed) == len(table.rows) == len(DEFAULT_REGISTRY)
    for payload_type, cls in DEFAULT_REGISTRY.items():
        _, domain, version, signer, fields, spec = listed[payload_type]
        assert _plain(domain) == cls.DOMAIN, payload_type
        assert int(version) == cls.VERSION, payload_type
        assert _plain(signer) == cls.SIGNER_FIELD, payload_type
        assert _names(fields) == [f for f, _ in fields_of(cls)][len(HEADER_FIELDS) :], payload_type
        [doc] = [n for n in _names(spec) if n.endswith(".md")]
        assert schema_tables()[cls.__name__].path == doc, f"{payload_type}: its schema table is not in {doc}"


# --- reason codes (00-conventions.md §10, and every spec's reason table) ---------------------------------------


def _reason_rows() -> dict[str, set[str]]:
    [table] = [t for t in tables("00-conventions.md") if t.header == ("Reason", "Class", "Raised when")]
    out: dict[str, set[str]] = {}
    current = ""
    for reason, classes, _when in table.rows:
        if reason:
            [current] = _names(reason)
            assert current not in out, f"reason {current} has two rows"
            out[current] = set()
        out[current] |= {part.strip() for name in _names(classes) for part in name.split("/")}
    return out


def test_reason_table_lists_every_reason_and_only_those() -> None:
    rows = _reason_rows()
    assert set(rows) == {r.value for r in Reason}
    for reason, classes in rows.items():
        for name in classes:
            cls = getattr(errors, name, None)
            assert isinstance(cls, type) and issubclass(cls, P2PComputeError), f"{reason}: {name} is not an error class"


def _raise_sites() -> list[tuple[str, int, str, str]]:
    """(file, line, class, reason) of every ``SomeError(Reason.X, ...)`` in the package."""
    sites: list[tuple[str, int, str, str]] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args):
                continue
            cls = getattr(errors, node.func.id, None)
            first = node.args[0]
            if not (isinstance(cls, type) and issubclass(cls, P2PComputeError)):
                continue
            if isinstance(first, ast.Attribute) and isinstance(first.value, ast.Name) and first.value.id == "Reason":
                rel = str(path.relative_to(PACKAGE.parent))
                sites.append((rel, node.lineno, node.func.id, Reason[first.attr].value))
    return sites


def test_reason_table_names_the_class_each_reason_is_raised_as() -> None:
    rows = _reason_rows()
    sites = _raise_sites()
    assert len(sites) > 100  # the scan sees the package
    wrong = [
        f"{file}:{line}: {cls}({reason}) but 00-conventions.md §10 lists {sorted(rows[reason])}"
        for file, line, cls, reason in sites
        if cls not in rows[reason]
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", [n for n in SCHEMA_SPECS if n != "00-conventions.md"])
def test_other_reason_tables_name_known_reasons(name: str) -> None:
    known = {r.value for r in Reason}
    for table in tables(name):
        if table.header[:2] != ("Reason", "Class"):
            continue
        for row in table.rows:
            for reason in re.findall(r"`([a-z_]+)`", row[0]):
                assert reason in known, f"{name}:{table.line}: `{reason}` is not a reason code"
            for cls in _names(row[1]):
                for part in cls.split("/"):
                    assert hasattr(errors, part.strip()), f"{name}:{table.line}: {part} is not an error class"


def test_decline_reasons_are_the_code_s() -> None:
    [table] = [t for t in tables("negotiation.md") if t.header == ("Decline reason", "When")]
    assert [_plain(row[0]) for row in table.rows] == [r.value for r in DeclineReason]


# --- parameters and constants --------------------------------------------------------------------------------------

_UNITS = {"ms": 1, "s": 1000, "min": 60_000, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def value(cell: str) -> int | float:
    """The leading quantity of a cell: ``1 048 576 (= MAX_FRAME_SIZE)``, ``10 s`` (in ms), ``16 KiB``, ``0.05``."""
    found = re.match(r"(\d{1,3}(?:[ ,]\d{3})+|\d+(?:\.\d+)?)(?:\s*(ms|s|min|KiB|MiB|GiB)\b)?", _plain(cell))
    assert found, f"no quantity in {cell!r}"
    n = number(found.group(1).replace(" ", ""))
    return n * _UNITS[found.group(2)] if found.group(2) else n


def param(spec: str, name: str) -> str:
    """The second cell of the one row, in any table of ``spec``, whose first cell is ``name``."""
    hits = [row[1] for table in tables(spec) for row in table.rows if _plain(row[0]) == name]
    assert len(hits) == 1, f"{spec}: {len(hits)} rows named {name!r}"
    return hits[0]


_NEG = NegotiationPolicy()
_REP = ReputationPolicy()
_ADV = AdvertPolicy()
_REACH = ReachPolicy()
_NODE = NodeConfig(data_dir=Path("unused"))
_RELAY = relay.RelayServiceLimits()
PARAMETERS: list[tuple[str, str, int | float]] = [
    ("00-conventions.md", "max_bytes", codec.DEFAULT_LIMITS.max_bytes),
    ("00-conventions.md", "max_str_len", codec.DEFAULT_LIMITS.max_str_len),
    ("00-conventions.md", "max_bin_len", codec.DEFAULT_LIMITS.max_bin_len),
    ("00-conventions.md", "max_array_len", codec.DEFAULT_LIMITS.max_array_len),
    ("00-conventions.md", "max_map_len", codec.DEFAULT_LIMITS.max_map_len),
    ("00-conventions.md", "max_depth", codec.DEFAULT_LIMITS.max_depth),
    ("00-conventions.md", "FRAME_HEADER_SIZE", codec.FRAME_HEADER_SIZE),
    ("00-conventions.md", "MAX_FRAME_SIZE", codec.MAX_FRAME_SIZE),
    ("00-conventions.md", "max_ttl_ms", replay.DEFAULT_MAX_TTL_MS),
    ("00-conventions.md", "capacity", replay.DEFAULT_SEEN_CAPACITY),
    ("identity-and-envelopes.md", "Seed (private key)", identity.SEED_SIZE),
    ("identity-and-envelopes.md", "Public key", identity.PUBLIC_KEY_SIZE),
    ("identity-and-envelopes.md", "Signature", identity.SIGNATURE_SIZE),
    ("identity-and-envelopes.md", "Peer id", identity.PEER_ID_SIZE),
    ("identity-and-envelopes.md", "MAX_ENVELOPE_SIZE", MAX_ENVELOPE_SIZE),
    ("identity-and-envelopes.md", "MAX_PAYLOAD_SIZE", MAX_PAYLOAD_SIZE),
    ("adverts.md", "max_advert_size", _ADV.max_size),
    ("adverts.md", "max_lifetime", _ADV.max_lifetime_ms),
    ("adverts.md", "max_clock_skew", _ADV.max_clock_skew_ms),
    ("adverts.md", "max_peers", _ADV.max_peers),
    ("adverts.md", "max_tombstones", _ADV.max_tombstones),
    ("negotiation.md", "offer_timeout", _NEG.offer_timeout_ms),
    ("negotiation.md", "accept_timeout", _NEG.accept_timeout_ms),
    ("negotiation.md", "inputs_timeout", _NEG.inputs_timeout_ms),
    ("negotiation.md", "receipt_timeout", _NEG.receipt_timeout_ms),
    ("negotiation.md", "max_streams_per_peer", _NEG.max_streams_per_peer),
    ("negotiation.md", "signed envelope", MAX_SIGNED_SIZE),
    ("negotiation.md", "job spec", MAX_SPEC_SIZE),
    ("verification.md", "quorum", QuorumPolicy().quorum),
    ("verification.md", "max_workers", QuorumPolicy().max_workers),
    ("verification.md", "max_attempts", QuorumPolicy().max_attempts),
    ("verification.md", "max_evidence_size", MAX_EVIDENCE_SIZE),
    ("verification.md", "evidence_ttl", DEFAULT_EVIDENCE_TTL_MS),
    ("verification.md", "valid_gain", _REP.valid_gain),
    ("verification.md", "invalid_penalty", _REP.invalid_penalty),
    ("verification.md", "timeout_penalty", _REP.timeout_penalty),
    ("verification.md", "declined_penalty", _REP.declined_penalty),
    ("verification.md", "bad_evidence_penalty", _REP.bad_evidence_penalty),
    ("verification.md", "report_penalty", _REP.report_penalty),
    ("verification.md", "reports_to_flag", _REP.reports_to_flag),
    ("verification.md", "max_score", _REP.max_score),
    ("verification.md", "trust_streak", _REP.trust_streak),
    ("verification.md", "decay", _REP.decay),
    ("verification.md", "min_replication", _REP.min_replication),
    ("verification.md", "spot_check_rate", _REP.spot_check_rate),
    ("verification.md", "reputation records", _REP.max_peers),
    ("verification.md", "counted accusations remembered", EvidenceInbox().max_remembered),
    ("ledger.md", "receipt_grace", DEFAULT_RECEIPT_GRACE_MS),
    ("reachability.md", "autonat_confirmations", _REACH.confirmations),
    ("reachability.md", "verdict_ttl (core.reach)", _REACH.verdict_ttl_ms),
    ("reachability.md", "max_verdicts (core.reach)", _REACH.max_verdicts),
    ("reachability.md", "max_relays (core.reach)", _REACH.max_relays),
    ("reachability.md", "AUTONAT_SERVERS_PER_ROUND (net.reach)", reach.AUTONAT_SERVERS_PER_ROUND),
    ("reachability.md", "AUTONAT_QUERY_TIMEOUT_S (net.reach)", reach.AUTONAT_QUERY_TIMEOUT_S * 1000),
    ("reachability.md", "PROBE_TIMEOUT_S (net.reach)", reach.PROBE_TIMEOUT_S * 1000),
    ("reachability.md", "MAX_PROBE_ADDRS (net.reach)", reach.MAX_PROBE_ADDRS),
    ("reachability.md", "MAX_CONCURRENT_PROBES (net.reach)", reach.MAX_CONCURRENT_PROBES),
    ("reachability.md", "FIRST_CHECK_S (net.reach)", reach.FIRST_CHECK_S * 1000),
    ("reachability.md", "CHECK_INTERVAL_S (net.reach)", reach.CHECK_INTERVAL_S * 1000),
    ("reachability.md", "RESERVE_TIMEOUT_S (net.reach)", reach.RESERVE_TIMEOUT_S * 1000),
    ("reachability.md", "DIAL_TIMEOUT_S (net.reach)", reach.DIAL_TIMEOUT_S * 1000),
    ("reachability.md", "MAX_RELAYED_DIALS (net.reach)", reach.MAX_RELAYED_DIALS),
    ("reachability.md", "per_group (net.relay.RelayServiceLimits)", _RELAY.per_group),
    ("reachability.md", "per_peer_circuits (net.relay.RelayServiceLimits)", _RELAY.per_peer_circuits),
    ("reachability.md", "per_group_circuits (net.relay.RelayServiceLimits)", _RELAY.per_group_circuits),
    ("reachability.md", "CIRCUIT_IDLE_S (net.relay)", relay.CIRCUIT_IDLE_S * 1000),
    ("reachability.md", "STOP_TIMEOUT_S (net.relay)", relay.STOP_TIMEOUT_S * 1000),
    ("reachability.md", "MAX_PUNCH_ADDRS (net.holepunch)", holepunch.MAX_PUNCH_ADDRS),
    ("reachability.md", "PUNCH_ROUNDS (net.holepunch)", holepunch.PUNCH_ROUNDS),
    ("reachability.md", "MAX_SESSION_DIALS (net.holepunch)", holepunch.MAX_SESSION_DIALS),
    ("reachability.md", "MAX_CONCURRENT_PUNCHES (net.holepunch)", holepunch.MAX_CONCURRENT_PUNCHES),
    ("reachability.md", "PUNCH_COOLDOWN_S (net.holepunch)", holepunch.PUNCH_COOLDOWN_S * 1000),
    ("reachability.md", "PUNCH_MESSAGE_TIMEOUT_S (net.holepunch)", holepunch.PUNCH_MESSAGE_TIMEOUT_S * 1000),
    ("reachability.md", "relay_max_reservations", _NODE.relay_max_reservations),
    ("reachability.md", "relay_max_circuits", _NODE.relay_max_circuits),
    ("reachability.md", "relay_circuit_mib", _NODE.relay_circuit_mib),
    ("reachability.md", "relay_circuit_seconds", _NODE.relay_circuit_seconds * 1000),
]


@pytest.mark.parametrize(("spec", "name", "expected"), PARAMETERS, ids=[f"{s}:{n}" for s, n, _ in PARAMETERS])
def test_parameter_tables_state_the_code_s_defaults(spec: str, name: str, expected: int | float) -> None:
    assert value(param(spec, name)) == expected


def test_ledger_hash_and_signature_formulas_are_the_code_s() -> None:
    [entry_domain] = re.findall(r'"([^"]+)"', param("ledger.md", "entry hash domain"))
    [signature_domain] = re.findall(r'"([^"]+)"', param("ledger.md", "entry signature domain"))
    assert entry_domain.endswith("\\0") and signature_domain.endswith("\\0")
    e = entry_domain.removesuffix("\\0").encode() + b"\x00"
    sig = signature_domain.removesuffix("\\0").encode() + b"\x00"
    prev, receipt = bytes(range(32)), b"receipt bytes"
    expected = hashlib.sha256(e + (7).to_bytes(8, "big") + prev + hashlib.sha256(receipt).digest()).digest()
    assert entry_hash(7, prev, receipt) == expected
    for role in LedgerRole:
        assert entry_signing_bytes(role, expected) == sig + role.value.encode() + b"\x00" + expected


def test_job_format_dtype_table_is_the_code_s() -> None:
    # TensorMeta.dtype is "a name of §8's dtype table" (job-format.md); the schema refuses any other (bad_dtype).
    [table] = [t for t in tables("job-format.md") if t.header[:2] == ("dtype", "itemsize")]
    stated: dict[str, int] = {}
    for names, sizes, _notes in table.rows:
        dtypes = _names(names)
        widths = [int(n) for n in re.findall(r"\d+", sizes)]
        if len(widths) == 1:
            widths *= len(dtypes)
        assert len(widths) == len(dtypes), names
        stated.update(zip(dtypes, widths, strict=True))
    assert stated == DTYPES
    [(_, dtype)] = [(f, ft) for f, ft in fields_of(core_structs()["TensorMeta"]) if f == "dtype"]
    assert isinstance(dtype, TStr) and dtype.names == frozenset(DTYPES) and dtype.reason is Reason.BAD_DTYPE


def _module_constants(module: str) -> dict[str, object]:
    """Literal module-level constants of ``p2pcompute/net/<module>.py``, read without importing it (no libp2p)."""
    out: dict[str, object] = {}
    tree = ast.parse((PACKAGE / "net" / f"{module}.py").read_text(encoding="utf-8"))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        value_node = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(target, ast.Name) and value_node is not None:
            if isinstance(value_node, ast.Call) and value_node.args:  # TProtocol("/p2pcompute/...")
                value_node = value_node.args[0]
            try:
                out[target.id] = ast.literal_eval(value_node)
            except ValueError:
                continue
    return out


def test_discovery_constants_are_the_code_s() -> None:
    [table] = [t for t in tables("discovery.md") if t.header[:2] == ("Constant (`module`)", "Default")]
    checked = 0
    for name_cell, default, _meaning in table.rows:
        found = re.fullmatch(r"`([A-Z_]+)` \(`(host|discovery|protocols)`\)", name_cell)
        if not found:
            continue  # py-libp2p's own, or a config key
        constant = _module_constants(found.group(2))[found.group(1)]
        if isinstance(constant, bytes):
            assert _plain(default) == constant.decode(), name_cell
        else:
            quantity = re.fullmatch(r"(\d+(?:\.\d+)?)( s)?", _plain(default))
            assert quantity and float(quantity.group(1)) == constant, f"discovery.md: {name_cell} is {constant}"
        checked += 1
    assert checked >= 15


def test_every_p2pcompute_protocol_id_and_topic_is_in_a_spec_header() -> None:
    ids = [v for v in _module_constants("protocols").values() if isinstance(v, str) and v.startswith("/p2pcompute/")]
    assert len(ids) >= 4
    specs = sorted(p.name for p in SPECS.glob("*.md") if p.name != "README.md")
    headers = " ".join(row[1] for name in specs for row in tables(name)[0].rows if row[0] == "Protocol ids")
    for protocol in ids:
        assert f"`{protocol}`" in headers, f"{protocol} is named in no spec's header"

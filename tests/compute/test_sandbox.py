"""The executor child's OS sandbox: each layer tested by a child that tries what the layer forbids.

The probe (``python -m p2pcompute.compute._child --sandbox-probe``, a test-only entry point that jobs never reach)
confines itself exactly as a serving child does, with all layers or just the ones named, then tries to open sockets,
connect out, fork, exec, ptrace and signal its parent, become root, read a secret, write a file, open many files,
raise and pass its address-space limit. A run with the sandbox off is the control: there, each attempt succeeds, so
a refusal under a layer is that layer's doing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pcompute.compute import sandbox
from p2pcompute.compute._child import FRAME_PREFIX
from p2pcompute.compute.executor import open_executor
from p2pcompute.core import codec
from p2pcompute.errors import ConfigError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox layers are Linux features")

ROOT = os.geteuid() == 0
PROBE_TIMEOUT_S = 120
UID = sandbox.SANDBOX_UID_BASE + 4242


@pytest.fixture
def listener() -> Iterator[tuple[str, int]]:
    """A TCP listener on loopback: a connection the probe should not be able to make."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file of the node's (0600, in its data directory): a sandboxed child must not read it."""
    path = tmp_path / "identity.key"
    path.write_bytes(b"not for jobs")
    path.chmod(0o600)
    return path


def _child(*args: str) -> dict[str, Any]:
    """Run the child with ``args``; return its one message."""
    proc = subprocess.run(
        [sys.executable, "-m", "p2pcompute.compute._child", "--device", "cpu", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=PROBE_TIMEOUT_S,
        check=False,
    )
    out = proc.stdout
    assert len(out) >= FRAME_PREFIX.size, f"no message (exit {proc.returncode}): {proc.stderr.decode()[-2000:]}"
    (length,) = FRAME_PREFIX.unpack(out[: FRAME_PREFIX.size])
    message = codec.unpack(out[FRAME_PREFIX.size : FRAME_PREFIX.size + length])
    assert isinstance(message, dict)
    return message


def _probe(layers: str | None, listener: tuple[str, int], secret: Path, writable: Path) -> dict[str, Any]:
    args = ["--sandbox-probe", "--probe-connect", f"{listener[0]}:{listener[1]}"]
    args += ["--probe-secret", str(secret), "--probe-writable", str(writable)]
    if layers is None:
        args += ["--sandbox", "off"]
    else:
        args += ["--sandbox", "required", "--sandbox-layers", layers]
        if ROOT:
            args += ["--sandbox-uid", str(UID)]
    message = _child(*args)
    assert message["type"] == "probe", message
    report = message["report"]
    assert isinstance(report, dict)
    return report


def _refused(report: dict[str, Any], *attempts: str) -> None:
    for attempt in attempts:
        assert str(report[attempt]).startswith("refused"), f"{attempt}: {report[attempt]}"


def test_without_the_sandbox_every_attempt_succeeds(listener: tuple[str, int], secret: Path, tmp_path: Path) -> None:
    """The control: the probe's attempts do work when nothing stops them."""
    report = _probe(None, listener, secret, tmp_path)
    allowed = ["socket_inet", "socket_unix", "connect_loopback", "fork", "exec", "kill_parent", "write_file"]
    allowed += ["open_files_past_limit", "read_secret"]
    for attempt in allowed:
        assert report[attempt] == "allowed", f"{attempt}: {report[attempt]}"
    assert set(report["layers"].values()) == {"off"}


@pytest.mark.skipif(not ROOT, reason="the node runs as root only here; unprivileged it needs user namespaces")
def test_network_namespace_cuts_every_connection(listener: tuple[str, int], secret: Path, tmp_path: Path) -> None:
    report = _probe("netns", listener, secret, tmp_path)
    assert report["layers"]["netns"] == "active"
    assert report["connect_loopback"] == "refused: ENETUNREACH"


@pytest.mark.skipif(not ROOT, reason="dropping to a uid of its own needs a root node")
def test_own_uid_cannot_read_signal_or_trace_the_node(listener: tuple[str, int], secret: Path, tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    report = _probe("uid", listener, secret, tmp_path)
    assert report["layers"]["uid"] == "active"
    assert report["uid"] == UID
    _refused(report, "read_secret", "write_file", "kill_parent", "ptrace_parent", "setuid_root")
    assert report["dumpable"] == 0


def test_no_new_privileges(listener: tuple[str, int], secret: Path, tmp_path: Path) -> None:
    report = _probe("no_new_privs", listener, secret, tmp_path)
    assert report["layers"]["no_new_privs"] == "active"
    assert report["no_new_privs"] == 1
    assert report["dumpable"] == 0


def test_landlock_allows_no_file_outside_the_install(listener: tuple[str, int], secret: Path, tmp_path: Path) -> None:
    report = _probe("landlock", listener, secret, tmp_path)
    if report["layers"]["landlock"] != "active":
        pytest.skip(f"Landlock: {report['layers']['landlock']}")
    _refused(report, "read_secret", "write_file", "exec")


def test_rlimits_bound_memory_files_and_cores(listener: tuple[str, int], secret: Path, tmp_path: Path) -> None:
    report = _probe("rlimits", listener, secret, tmp_path)
    assert report["layers"]["rlimits"] == "active"
    assert report["allocate_past_limit"] == "refused: MemoryError"
    assert report["raise_address_space"] == "refused: ValueError"
    assert report["open_files_past_limit"] == "refused: EMFILE"
    assert report["core_limit"] == 0


def test_seccomp_refuses_sockets_processes_and_signals(listener: tuple[str, int], secret: Path, tmp_path: Path) -> None:
    report = _probe("seccomp", listener, secret, tmp_path)
    assert report["layers"]["seccomp"] == "active"
    for attempt in ("socket_inet", "socket_unix", "connect_loopback", "fork", "exec", "kill_parent", "ptrace_parent"):
        assert report[attempt] == "refused: EPERM", f"{attempt}: {report[attempt]}"


def test_all_layers_together(listener: tuple[str, int], secret: Path, tmp_path: Path) -> None:
    report = _probe(",".join(sandbox.LAYERS), listener, secret, tmp_path)
    expected = {name: "active" for name in sandbox.LAYERS}
    if not ROOT:
        expected.pop("uid")
        expected.pop("netns")
    assert {k: v for k, v in report["layers"].items() if k in expected} == expected
    _refused(report, "socket_inet", "socket_unix", "connect_loopback", "fork", "exec", "kill_parent")
    _refused(report, "ptrace_parent", "setuid_root", "read_secret", "write_file", "open_files_past_limit")
    _refused(report, "allocate_past_limit", "raise_address_space")


def test_required_mode_refuses_to_start_without_a_layer() -> None:
    """``sandbox = "required"`` and a layer that cannot be had: the child says why in one line and stops."""
    # a root child given no uid to drop to cannot have the uid layer; an unprivileged one never can
    message = _child("--sandbox", "required")
    assert message["type"] == "fatal"
    detail = message["detail"]
    assert "required" in detail and "uid" in detail
    assert "\n" not in detail


async def test_executor_reports_its_layers_and_runs_jobs_inside_them() -> None:
    from tests.compute.test_executor import _mlp_job, _run, _tensor

    job, expected = _mlp_job()
    with trio.fail_after(PROBE_TIMEOUT_S):
        async with open_executor(workers=1, memory_limit=256 << 20) as executor:
            assert executor.sandbox["seccomp"] == "active"
            assert executor.sandbox["no_new_privs"] == "active"
            if ROOT:
                assert executor.sandbox["uid"] == "active"
                assert executor.sandbox["netns"] == "active"
            result = await _run(executor, job)
            assert _tensor(result).allclose(expected, rtol=1e-5, atol=1e-6)
            assert "active:" in sandbox.describe(executor.sandbox)


@pytest.mark.skipif(ROOT, reason="as root every layer is available here")
async def test_required_executor_refuses_to_start_unprivileged() -> None:
    with pytest.raises(ConfigError, match="required"), trio.fail_after(PROBE_TIMEOUT_S):
        async with open_executor(workers=1, sandbox="required"):
            pass

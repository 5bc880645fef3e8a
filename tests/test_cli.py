"""The p2pcompute command, run as a real subprocess."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

import p2pcompute
from p2pcompute.cli import main
from p2pcompute.client import Job
from p2pcompute.compute.gpu import CACHE_FILE, HardwareReport
from p2pcompute.core.jobspec import CompareMode, decode_bundle, decode_job
from p2pcompute.core.messages import Device, DeviceKind, Software


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pcompute.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert p2pcompute.__version__ in result.stdout


def test_keys_new_show_and_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    created = run("keys", "new", "--path", str(path))
    assert created.returncode == 0, created.stderr
    assert (path.stat().st_mode & 0o777) == 0o600
    peer_id = created.stdout.split("peer id:")[1].strip()

    shown = run("keys", "show", "--path", str(path), "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info == {"peer_id": peer_id, "public_key": info["public_key"], "path": str(path)}
    assert len(bytes.fromhex(info["public_key"])) == 32

    again = run("keys", "new", "--path", str(path))
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert "Traceback" not in again.stderr
    assert json.loads(run("keys", "show", "--path", str(path), "--json").stdout)["peer_id"] == peer_id

    forced = run("keys", "new", "--path", str(path), "--force")
    assert forced.returncode == 0
    assert json.loads(run("keys", "show", "--path", str(path), "--json").stdout)["peer_id"] != peer_id


def test_default_path_comes_from_p2pcompute_home(tmp_path: Path) -> None:
    env = {"P2PCOMPUTE_HOME": str(tmp_path)}
    assert run("keys", "new", env=env).returncode == 0
    shown = run("keys", "show", env=env)
    assert shown.returncode == 0
    assert str(tmp_path / "identity.key") in shown.stdout
    assert "peer_id:" in shown.stdout


def test_helpful_errors(tmp_path: Path) -> None:
    missing = run("keys", "show", "--path", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert "p2pcompute keys new" in missing.stderr
    assert "[key_file_missing]" in missing.stderr

    path = tmp_path / "k"
    assert run("keys", "new", "--path", str(path)).returncode == 0
    path.chmod(0o644)
    unsafe = run("keys", "show", "--path", str(path))
    assert unsafe.returncode == 1
    assert "chmod 600" in unsafe.stderr
    assert "Traceback" not in unsafe.stderr


# --- job export and submit (in process: torch is imported once) ------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "testnet" / "examples" / "mlp.py"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("_mlp_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_export_writes_a_bundle_that_runs_like_the_module(tmp_path: Path) -> None:
    out = tmp_path / "mlp.job"
    result = invoke("job", "export", f"{EXAMPLE}:model", "--out", str(out))
    assert result.exit_code == 0, result.output
    job = Job.from_bundle(out.read_bytes())  # checks every tensor against its hash, dry-runs the graph
    assert f"digest:     {job.digest.hex()}" in result.output
    assert job.outputs == (("float32", (32, 10)),)
    assert "outputs:    float32[32, 10]" in result.output
    assert "ops:        " in result.output and "tolerance (rtol 0.0001, atol 1e-05)" in result.output

    example = _load_example()
    with torch.no_grad():
        expected = example.model(*example.example_inputs())
    torch.testing.assert_close(job.run_locally()[0], expected)

    again = tmp_path / "again.job"
    assert invoke("job", "export", f"{EXAMPLE}:model", "--out", str(again)).exit_code == 0
    assert again.read_bytes() == out.read_bytes()  # fixed weights and inputs: the same bundle every time


def test_job_export_of_a_class_and_of_a_function(tmp_path: Path) -> None:
    exact = tmp_path / "class.job"
    result = invoke("job", "export", f"{EXAMPLE}:MLP", "--out", str(exact), "--compare", "exact")
    assert result.exit_code == 0, result.output
    assert decode_job(decode_bundle(exact.read_bytes())[0]).compare.mode is CompareMode.EXACT

    function = tmp_path / "affine.job"
    result = invoke(
        "job", "export", f"{EXAMPLE}:affine", "--inputs", "affine_inputs", "--out", str(function), "--atol", "0.5"
    )
    assert result.exit_code == 0, result.output
    job = Job.from_bundle(function.read_bytes())
    assert job.outputs == (("float32", (32, 16)),)
    assert decode_job(job.spec_bytes).compare.atol == 0.5
    x, w = _load_example().affine_inputs()
    torch.testing.assert_close(job.run_locally()[0], torch.relu(x @ w + 1.0))


def test_job_export_dotted_module_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "square_job.py").write_text(
        "import torch\n\ndef square(x):\n    return x * x\n\nexample_inputs = (torch.ones(3),)\n"
    )
    monkeypatch.chdir(tmp_path)  # MODULE is importable from the current directory, as with `python -m`
    result = invoke("job", "export", "square_job:square", "--out", "square.job")
    assert result.exit_code == 0, result.output
    assert Job.from_bundle((tmp_path / "square.job").read_bytes()).run_locally()[0].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("target", "extra", "message"),
    [
        ("no-colon", (), "expected MODULE:NAME"),
        ("{dir}/missing.py:model", (), "no such file"),
        ("no_such_module_p2pc:model", (), "cannot import no_such_module_p2pc"),
        ("{example}:nothing", (), "has no attribute 'nothing'"),
        ("{example}:BATCH", (), "is of type int: expected an nn.Module"),
        ("{example}:model", ("--inputs", "missing_inputs"), "has no 'missing_inputs'"),
        ("{example}:model", ("--inputs", "IN_FEATURES"), "must be a tuple of tensors, not int"),
        ("{example}:affine", (), "[not_exportable]"),  # called with one input, the function takes two
        ("{dir}/broken.py:f", (), "importing {dir}/broken.py failed: ZeroDivisionError"),
    ],
)
def test_job_export_errors_are_one_line(tmp_path: Path, target: str, extra: tuple[str, ...], message: str) -> None:
    (tmp_path / "broken.py").write_text("1 / 0\n")
    fill = {"dir": str(tmp_path), "example": str(EXAMPLE)}
    out = tmp_path / "x.job"
    result = CliRunner().invoke(main, ["job", "export", target.format(**fill), "--out", str(out), *extra])
    assert result.exit_code == 1, result.output
    assert message.format(**fill) in result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert not out.exists()


def test_submit_needs_a_bootstrap_and_a_valid_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("P2PCOMPUTE_BOOTSTRAP", raising=False)
    bundle = tmp_path / "mlp.job"
    assert invoke("job", "export", f"{EXAMPLE}:model", "--out", str(bundle)).exit_code == 0
    no_bootstrap = CliRunner().invoke(main, ["submit", str(bundle)])
    assert no_bootstrap.exit_code == 1
    assert "submit needs --bootstrap ADDR" in no_bootstrap.output

    addr = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWBehrqEkFDQq79AD891NhBaGWBrwqb2FMJywLvSKXLvzb"
    garbage = tmp_path / "garbage.job"
    garbage.write_bytes(b"\x93not a bundle")
    bad = CliRunner().invoke(main, ["submit", str(garbage), "--bootstrap", addr])
    assert bad.exit_code == 1
    assert bad.output.startswith("Error: ") and bad.output.count("\n") == 1

    missing = CliRunner().invoke(main, ["submit", str(tmp_path / "none.job"), "--bootstrap", addr])
    assert missing.exit_code == 1
    assert "cannot read" in missing.output

    bad_price = CliRunner().invoke(main, ["submit", str(bundle), "--bootstrap", addr, "--max-price", "cheap"])
    assert bad_price.exit_code == 1
    assert "price 'cheap' is not a number" in bad_price.output


def _export_mlp(tmp_path: Path) -> Path:
    bundle = tmp_path / "mlp.job"
    assert invoke("job", "export", f"{EXAMPLE}:model", "--out", str(bundle)).exit_code == 0
    return bundle


def test_submit_inputs_that_do_not_fit_the_job_fail_in_one_line_before_any_work(tmp_path: Path) -> None:
    bundle = _export_mlp(tmp_path)  # one input, float32[32, 64]
    addr = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWBehrqEkFDQq79AD891NhBaGWBrwqb2FMJywLvSKXLvzb"  # nobody listens
    torch.save(torch.ones(3, 32, 65), tmp_path / "wide.pt")
    torch.save({"0": torch.ones(3, 32, 64, dtype=torch.float64)}, tmp_path / "double.pt")
    cases = (
        ("wide.pt", "the job takes float32[32, 64]: expected [N, 32, 64] or [N*32, 64] for N tasks [shape_mismatch]"),
        ("double.pt", "input 0 ('0') is float64, the job takes float32 [shape_mismatch]"),
        ("none.safetensors", "none.safetensors: no such file [bad_argument]"),
    )
    for name, message in cases:
        out = tmp_path / f"out-{name}"
        result = CliRunner().invoke(
            main,
            ["submit", str(bundle), "--inputs", str(tmp_path / name), "--bootstrap", addr, "--save-outputs", str(out)],
            env={"P2PCOMPUTE_HOME": str(tmp_path / "home")},
        )
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
        assert message in result.output, result.output
        assert not out.exists()  # refused before any work


async def test_submit_inputs_runs_every_task_on_workers_and_saves_outputs(tmp_path: Path) -> None:
    """`submit --inputs` (a real CLI process) against two in-process workers: 6 tasks in a safetensors file, each
    verified and paid, outputs saved per task and equal to local execution; the summary names tasks, workers, credits,
    wall time and throughput."""
    import httpx
    import trio
    from safetensors.torch import load_file, save_file

    from p2pcompute.testing.jobs import cluster

    bundle = _export_mlp(tmp_path)
    model = _load_example().model
    batch = torch.randn(6 * 32, 64, generator=torch.Generator().manual_seed(5))
    save_file({"0": batch}, str(tmp_path / "tasks.safetensors"))  # rows: 6 tasks of the job's batch of 32
    out = tmp_path / "outputs"
    with trio.fail_after(240):
        async with cluster(tmp_path / "workers", 2) as workers:
            done = await trio.run_process(
                [
                    sys.executable, "-m", "p2pcompute.cli", "submit", str(bundle),
                    "--inputs", str(tmp_path / "tasks.safetensors"), "--bootstrap", workers[0].addr,
                    "--max-price", "1", "--save-outputs", str(out), "--data-dir", str(tmp_path / "client"),
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )  # fmt: skip
            counters = []  # the workers' own counters of the slot-time they held and the time they ran jobs
            async with httpx.AsyncClient(timeout=10) as http:
                for worker in workers:
                    jobs = (await http.get(worker.info.status_url)).json()["jobs"]
                    metrics = (await http.get(worker.info.status_url.replace("/status", "/metrics"))).text
                    counters.append((jobs["slot_busy_s"], jobs["exec_s"], jobs["counters"].get("results", 0)))
                    assert "p2pcompute_slot_busy_seconds_total" in metrics
                    assert "p2pcompute_exec_seconds_total" in metrics
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stdout + stderr
    assert "tasks:      6 done of 6, 0 failed" in stdout, stdout
    assert "(6 tasks from" in stdout and "named tensors (rows)" in stdout
    for part in ("workers:    ", "credits:    ", "wall time:  ", "throughput: ", "tasks/s"):
        assert part in stdout, stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 6 and [r["index"] for r in summary["results"]] == list(range(6))
    assert summary["credits_micro"] > 0 and summary["workers"] >= 1
    assert sum(results for _, _, results in counters) >= 6
    for busy, spent, results in counters:  # a slot is held from admission to receipt: the run is a part of it
        assert (busy > 0 or results == 0) and 0 <= spent <= busy
    with torch.no_grad():
        for i in range(6):
            saved = load_file(str(out / f"task-{i:06d}.safetensors"))
            torch.testing.assert_close(saved["0"], model(batch[i * 32 : (i + 1) * 32]))


# --- failures at the edge: one line on stderr, exit status 1, the option to change -----------------------------------

DEAD_PEER = "12D3KooWBehrqEkFDQq79AD891NhBaGWBrwqb2FMJywLvSKXLvzb"  # nobody runs this peer


def _busy_port() -> socket.socket:
    """A socket listening on 127.0.0.1 (the caller closes it): its port is taken."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _node_dir(tmp_path: Path) -> Path:
    """A data directory whose cached hardware report spares `node run` the probe (a child importing torch)."""
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    report = HardwareReport(
        devices=(
            Device(
                kind=DeviceKind.CPU, name="Test CPU", memory_bytes=8 << 30, free_memory_bytes=4 << 30, tflops=0.1,
                compute_capability="", cores=2,
            ),
        ),
        software=Software(p2pcompute=p2pcompute.__version__, torch="2.13.0+cpu", cuda="", python="3.11.7"),
        driver="",
        probed_at=0.0,
    )  # fmt: skip
    (data_dir / CACHE_FILE).write_text(json.dumps(report.to_json()))
    (tmp_path / "relay.toml").write_text("serve_jobs = false\n")  # no executor pool: start-up in seconds
    return data_dir


def _error_line(stderr: str) -> str:
    """The whole of stderr, which must be one line starting with Error: (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def test_node_run_on_a_busy_listen_port_fails_in_one_line(tmp_path: Path) -> None:
    """0.8.1 would share a busy port (SO_REUSEPORT); a second node on it must refuse to start, in one line."""
    data_dir = _node_dir(tmp_path)
    with _busy_port() as busy:
        port = busy.getsockname()[1]
        result = run(
            "--log-level", "warning", "node", "run", "--config", str(tmp_path / "relay.toml"), "--data-dir",
            str(data_dir), "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--status-port", "0",
        )  # fmt: skip
    assert result.returncode == 1
    line = _error_line(result.stderr)
    assert f"cannot listen on /ip4/127.0.0.1/tcp/{port}" in line and "--listen" in line and "[listen_failed]" in line


def test_a_second_node_takes_a_free_status_port_and_says_which(tmp_path: Path) -> None:
    """The status endpoint is local: when its port is taken (another node here), any free port will do."""
    data_dir = _node_dir(tmp_path)
    with _busy_port() as busy:
        taken = busy.getsockname()[1]
        node = subprocess.Popen(
            [
                sys.executable, "-m", "p2pcompute.cli", "--log-level", "warning", "node", "run", "--config",
                str(tmp_path / "relay.toml"), "--data-dir", str(data_dir), "--listen", "/ip4/127.0.0.1/tcp/0",
                "--status-port", str(taken), "--json-events",
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert node.stdout is not None
            ready = next(json.loads(line) for line in node.stdout if line.startswith("{"))  # bounded by run's timeout
            url = ready["status_url"]
            assert url.startswith("http://127.0.0.1:") and f":{taken}/" not in url
            status = run("status", "--json", "--data-dir", str(data_dir))
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["peer_id"] == ready["peer_id"]
        finally:
            node.send_signal(signal.SIGINT)
            _, err = node.communicate(timeout=60)
    assert node.returncode == 0, err
    [warning] = err.splitlines()
    assert f"status port {taken}" in warning and "--status-port" in warning


def test_a_client_command_keeps_library_warnings_off_the_terminal(tmp_path: Path) -> None:
    """`submit` with no reachable peer: one line, not py-libp2p's "Failed to open TCP stream" and a traceback."""
    bundle = tmp_path / "mlp.job"
    assert invoke("job", "export", f"{EXAMPLE}:model", "--out", str(bundle)).exit_code == 0
    with _busy_port() as closed:
        port = closed.getsockname()[1]
    result = run(
        "submit", str(bundle), "--data-dir", str(tmp_path / "client"), "--bootstrap",
        f"/ip4/127.0.0.1/tcp/{port}/p2p/{DEAD_PEER}",
    )  # fmt: skip
    assert result.returncode == 1
    line = _error_line(result.stderr)
    assert "cannot reach any bootstrap peer" in line and "--bootstrap" in line and "[dial_failed]" in line


# `node run` cases that would start a node if their check were missing also name an unusable data directory, so that
# such a regression fails (with the wrong message) instead of running a node for ever.
NO_DIR = ("--data-dir", "{file}/data")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("node", "run", *NO_DIR, "--listen", "/ip4/999.0.0.1/tcp/0"), ["listen address", "not IPv4", "--listen"]),
        (("node", "run", *NO_DIR, "--listen", "tcp/4001"), ["'tcp/4001' is not a multiaddr"]),
        (("node", "run", *NO_DIR, "--bootstrap", "/ip4/1.2.3.4/tcp/1/p2p/notapeerid"), ["bootstrap address"]),
        (("node", "run", *NO_DIR, "--bootstrap", "/ip4/127.0.0.1/tcp/1"), ["must end in /p2p/<peer id>"]),
        (("node", "run", "--data-dir", "{file}/data"), ["data directory", "Not a directory", "--data-dir"]),
        (("node", "run", "--config", "{dir}/bad.toml"), ["bad.toml", "[bad_config]"]),
        (("node", "run", "--config", "{dir}/slots.toml"), ["slots must be an integer", "[bad_config]"]),
        (("node", "run", "--config", "{dir}/listen.toml"), ["not a multiaddr", "`listen` in {dir}/listen.toml"]),
        (("node", "run", "--config", "{dir}/missing.toml"), ["does not exist"]),
        (("status", "--data-dir", "{dir}/broken"), ["node.json", "--url"]),
        (("status", "--url", "http://127.0.0.1:9/status"), ["is `p2pcompute node run` up?"]),
        (("peers", "--url", "not-a-url"), ["cannot read the node status"]),
        (("ledger", "--data-dir", "{dir}/nothing"), ["[key_file_missing]"]),
        (("keys", "new", "--path", "{file}/identity.key"), ["cannot create", "--path"]),
        (("keys", "show", "--path", "{dir}/nothing.key"), ["[key_file_missing]"]),
        (("testnet", "--peers", "2", "--dir", "{file}/net"), ["Not a directory", "--dir"]),
        (("testnet", "--peers", "1"), ["--peers must be 2..200"]),
        (("submit", "{file}", "--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/xyz"), ["bootstrap address", "--bootstrap"]),
        (("job", "export", "{file}:model", "--out", "{dir}/x.job"), ["cannot import", "not a Python file"]),
    ],
)
def test_every_failure_is_one_line(tmp_path: Path, args: tuple[str, ...], expected: list[str]) -> None:
    (tmp_path / "bad.toml").write_text("slots = [\n")
    (tmp_path / "slots.toml").write_text('slots = "two"\n')
    (tmp_path / "listen.toml").write_text('listen = ["/ip4/1.2.3/tcp/0"]\n')
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "node.json").write_text("{")
    (tmp_path / "a-file").write_text("not a directory\n")
    fill = {"dir": str(tmp_path), "file": str(tmp_path / "a-file")}
    result = CliRunner().invoke(main, [a.format(**fill) for a in args], env={"P2PCOMPUTE_HOME": str(tmp_path)})
    assert result.exit_code == 1, result.output
    line = _error_line(result.stderr)
    for text in expected:
        assert text.format(**fill) in line


def test_log_level_debug_shows_the_traceback(tmp_path: Path) -> None:
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    try:
        result = CliRunner().invoke(main, ["--log-level", "debug", "ledger", "--data-dir", str(tmp_path / "nothing")])
    finally:  # the command configured this process's root logger at DEBUG: later tests run at their own level
        root.setLevel(level)
        root.handlers[:] = handlers
    assert result.exit_code == 1
    assert "Traceback" in result.output
    assert result.output.splitlines()[-1].startswith("Error: ") and "[key_file_missing]" in result.output

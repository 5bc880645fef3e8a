"""Task files (``submit --inputs``): every layout read back as the same tasks, every mismatch refused in one line;
outputs written per task; the map summary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from p2pcompute.client import Job
from p2pcompute.errors import JobError, Reason
from p2pcompute.taskfile import MapSummary, read_task_inputs, result_line, save_task_outputs

TASKS = 5


@pytest.fixture(scope="module")
def job() -> Job:
    """Two inputs: float32[4, 3] and float32[3, 2]."""
    return Job.from_module(lambda a, b: a @ b, (torch.ones(4, 3), torch.ones(3, 2)))


@pytest.fixture(scope="module")
def one_input() -> Job:
    return Job.from_module(lambda a: a * 2, (torch.ones(4, 3),))


def _columns() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(TASKS, 4, 3, generator=generator), torch.randn(TASKS, 3, 2, generator=generator)


def _assert_tasks(tasks: object, a: torch.Tensor, b: torch.Tensor) -> None:
    assert len(tasks) == TASKS  # type: ignore[arg-type]
    for i, task in enumerate(tasks):  # type: ignore[attr-defined]
        assert len(task) == 2
        assert torch.equal(task[0], a[i]) and torch.equal(task[1], b[i]), i


@pytest.mark.parametrize(
    ("name", "build"),
    [
        ("stacked.safetensors", lambda a, b: {"0": a, "1": b}),
        ("rows.safetensors", lambda a, b: {"input0": a.reshape(TASKS * 4, 3), "input_1": b}),
        ("list.pt", lambda a, b: [(a[i], b[i]) for i in range(TASKS)]),
        ("tuple.pt", lambda a, b: tuple([a[i], b[i]] for i in range(TASKS))),
        ("dict.pth", lambda a, b: {"0": a, "1": b.reshape(TASKS * 3, 2)}),
    ],
)
def test_every_layout_reads_as_the_same_tasks(tmp_path: Path, job: Job, name: str, build: object) -> None:
    a, b = _columns()
    value = build(a, b)  # type: ignore[operator]
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(value, str(path))
    else:
        torch.save(value, path)
    tasks = read_task_inputs(path, job)
    _assert_tasks(tasks, a, b)
    assert tasks.layout
    for task in tasks:  # what client.map sends: each task builds the job
        assert job.with_inputs(task).spec.inputs[0].shape == (4, 3)


def test_a_one_input_job_takes_one_tensor_or_any_single_name(tmp_path: Path, one_input: Job) -> None:
    a, _ = _columns()
    torch.save(a, tmp_path / "one.pt")
    assert [t[0].shape for t in read_task_inputs(tmp_path / "one.pt", one_input)] == [(4, 3)] * TASKS
    torch.save(a.reshape(TASKS * 4, 3), tmp_path / "rows.pt")
    assert torch.equal(read_task_inputs(tmp_path / "rows.pt", one_input)[3][0], a[3])
    save_file({"x": a}, str(tmp_path / "named.safetensors"))
    assert len(read_task_inputs(tmp_path / "named.safetensors", one_input)) == TASKS
    torch.save([a[i] for i in range(TASKS)], tmp_path / "items.pt")  # a list of bare tensors
    assert torch.equal(read_task_inputs(tmp_path / "items.pt", one_input)[4][0], a[4])


def _write(path: Path, value: object) -> None:
    if path.suffix == ".safetensors":
        save_file(value, str(path))  # type: ignore[arg-type]
    else:
        torch.save(value, path)


A, B = _columns()


@pytest.mark.parametrize(
    ("name", "value", "reason", "message"),
    [
        ("counts.pt", {"0": A, "1": B[:4]}, "shape_mismatch", "different numbers of tasks: input 0: 5, input 1: 4"),
        ("dtype.safetensors", {"0": A.double(), "1": B}, "shape_mismatch", "input 0 ('0') is float64, the job takes"),
        ("shape.pt", {"0": torch.ones(5, 4, 4), "1": B}, "shape_mismatch", "expected [N, 4, 3] or [N*4, 3]"),
        ("rows.pt", {"0": torch.ones(7, 3), "1": B}, "shape_mismatch", "7 rows, not a multiple of the job's batch"),
        ("missing.pt", {"0": A}, "shape_mismatch", "no tensor for input 1 (float32[3, 2])"),
        ("unknown.safetensors", {"0": A, "2": B}, "shape_mismatch", "tensor '2' names no input of the job"),
        ("twice.pt", {"0": A, "input0": A, "1": B}, "shape_mismatch", "both name input 0"),
        ("count.pt", [(A[0],)], "shape_mismatch", "task 0 has 1 tensor(s), the job takes 2"),
        ("item.pt", [(A[0], B[0]), (A[1], torch.ones(2, 2))], "shape_mismatch", "task 1 input 1 is float32[2, 2]"),
        ("tensor.pt", A, "shape_mismatch", "one tensor, but the job takes 2 inputs"),
        ("empty.pt", [], "shape_mismatch", "holds no tasks"),
        ("kind.pt", 3, "bad_argument", "holds a int"),
        ("item2.pt", [{"a": A[0]}], "bad_argument", "task 0 is a dict"),
        ("code.pt", {"0": A, "1": B, "f": print}, "bad_argument", "Unsupported global"),
        ("inputs.npy", None, "bad_argument", "a task file ends in .safetensors, .pt, .pth"),
    ],
)
def test_a_file_that_does_not_fit_the_job_is_refused_in_one_line(
    tmp_path: Path, job: Job, name: str, value: object, reason: str, message: str
) -> None:
    path = tmp_path / name
    if value is not None:
        _write(path, value)
    else:
        path.write_bytes(b"\x93NUMPY")
    with pytest.raises(JobError) as caught:
        read_task_inputs(path, job)
    assert caught.value.reason is Reason(reason)
    assert message in caught.value.detail, caught.value.detail
    assert str(path) in caught.value.detail and "\n" not in caught.value.detail


def test_unreadable_files(tmp_path: Path, job: Job) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    (tmp_path / "junk.safetensors").write_bytes(b"xx")
    for name, message in (("junk.pt", "torch.load(weights_only=True) refused it"), ("junk.safetensors", "not a safe")):
        with pytest.raises(JobError, match=r"refused it|not a safetensors file") as caught:
            read_task_inputs(tmp_path / name, job)
        assert message in caught.value.detail and "\n" not in caught.value.detail
    with pytest.raises(JobError, match="no such file"):
        read_task_inputs(tmp_path / "none.pt", job)


def test_outputs_are_written_per_task_by_index(tmp_path: Path, job: Job) -> None:
    from p2pcompute.client import RunResult
    from p2pcompute.core.identity import KeyPair
    from p2pcompute.core.messages import Timings

    outputs = [torch.arange(6.0).reshape(3, 2), torch.ones(2, dtype=torch.int64)]
    worker = KeyPair.from_seed(bytes(32)).peer_id
    result = RunResult(
        outputs=outputs,
        output_digest=bytes(32),
        worker=worker,
        price=1500,
        timings=Timings(queue_ms=0, load_ms=0, exec_ms=1, total_ms=1),
        hardware_class="cpu:test",
        elapsed_ms=1,
        attempts=(),
        job_digest=job.digest,
        index=17,
    )
    path = save_task_outputs(tmp_path, result)
    assert path.name == "task-000017.safetensors"
    back = load_file(str(path))
    assert sorted(back) == ["0", "1"]
    assert torch.equal(back["0"], outputs[0]) and torch.equal(back["1"], outputs[1])
    line = result_line(result)
    assert line["index"] == 17 and line["file"] == path.name and line["price_micro_credits"] == 1500


def test_map_summary() -> None:
    summary = MapSummary(tasks=10, done=10, failed=0, retried=2, workers=3, credits=25_000, wall_s=4.0)
    assert summary.ok and summary.throughput == 2.5
    text = "\n".join(summary.lines())
    for part in ("10 done of 10, 0 failed, 2 placed again", "3 used", "0.025 paid (0.0025 per task)", "4.00 s"):
        assert part in text
    assert "2.50 tasks/s" in text and "failed:" not in text
    data = summary.to_json()
    assert data["tasks_per_second"] == 2.5 and data["credits"] == "0.025" and data["error"] is None

    stopped = MapSummary(
        tasks=10, done=4, failed=1, retried=2, workers=1, credits=10, wall_s=1.0, failed_index=4, error="x [timeout]"
    )
    assert not stopped.ok
    assert stopped.lines()[-1] == "failed:     task 4: x [timeout]"
    assert MapSummary(tasks=1, done=0, failed=1, retried=0, workers=0, credits=0, wall_s=0.0).throughput == 0.0

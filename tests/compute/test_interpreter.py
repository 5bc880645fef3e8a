"""The interpreter: tensors from checked bytes only, allow-listed ops only, limits checked on the meta device first."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

from p2pcompute.compute.interpreter import (
    DTYPE_BY_NAME,
    blob_to_tensor,
    check_memory,
    dry_run,
    execute,
    resolve_op,
    tensor_to_blob,
)
from p2pcompute.core import codec
from p2pcompute.core.jobspec import (
    ALLOWED_OPS,
    Device,
    DType,
    InputRef,
    JobLimits,
    JobSpec,
    MemoryFormat,
    Node,
    NodeRef,
    decode_job,
    encode_job,
)
from p2pcompute.core.schema import to_wire
from p2pcompute.core.tensors import DTYPES, TensorMeta, tensor_digest
from p2pcompute.errors import JobFormatError, Reason

MIB = 1 << 20


def blob(t: torch.Tensor) -> tuple[TensorMeta, bytes]:
    return tensor_to_blob(t)


def job(
    nodes: list[Node], outputs: list[NodeRef | InputRef], *inputs: torch.Tensor
) -> tuple[JobSpec, dict[bytes, bytes]]:
    pairs = [blob(t) for t in inputs]
    spec = JobSpec(inputs=tuple(m for m, _ in pairs), nodes=tuple(nodes), outputs=tuple(outputs))
    return spec, {m.digest: b for m, b in pairs}


def reason_of(call: object, *args: object, **kwargs: object) -> Reason:
    with pytest.raises(JobFormatError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value.reason


# --- tensors <-> bytes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 1, 2)])
def test_blob_round_trip_for_every_dtype(name: str, shape: tuple[int, ...]) -> None:
    t = (torch.arange(max(1, torch.Size(shape).numel())) % 2).to(DTYPE_BY_NAME[name])[: torch.Size(shape).numel()]
    t = t.reshape(shape)
    meta, data = tensor_to_blob(t)
    assert (meta.dtype, meta.shape, len(data)) == (name, shape, meta.nbytes)
    back = blob_to_tensor(meta, data)
    assert back.dtype == t.dtype and torch.equal(back, t)


def test_blob_is_little_endian_and_c_contiguous() -> None:
    t = torch.tensor([[1, 2], [3, 4]], dtype=torch.int16).t()  # not contiguous
    meta, data = tensor_to_blob(t)
    assert data == bytes([1, 0, 3, 0, 2, 0, 4, 0])
    assert meta.digest == tensor_digest(data)


def test_blob_tensor_is_a_private_copy() -> None:
    data = bytearray(tensor_to_blob(torch.ones(4))[1])
    meta = TensorMeta(digest=tensor_digest(data), dtype="float32", shape=(4,))
    t = blob_to_tensor(meta, data)
    data[:4] = bytes(4)
    assert torch.equal(t, torch.ones(4))


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(Path.cwd() / "pwned-by-pickle"),))


def test_pickle_bytes_are_never_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps(_Boom())
    real = torch.zeros(len(payload), dtype=torch.uint8)
    # instead of a tensor blob: same length, wrong hash
    meta = TensorMeta(digest=tensor_digest(bytes(real.tolist())), dtype="uint8", shape=(len(payload),))
    assert reason_of(blob_to_tensor, meta, payload) == Reason.HASH_MISMATCH
    assert reason_of(blob_to_tensor, TensorMeta(digest=meta.digest, dtype="float32", shape=(1,)), payload) == (
        Reason.SHAPE_MISMATCH
    )
    # a meta naming the pickle itself gives a byte tensor of it, nothing more
    own = TensorMeta(digest=tensor_digest(payload), dtype="uint8", shape=(len(payload),))
    assert bytes(blob_to_tensor(own, payload).tolist()) == payload
    # instead of a job: torch.save output and a plain pickle
    buffer = io.BytesIO()
    torch.save({"weights": torch.ones(2)}, buffer)
    assert reason_of(decode_job, buffer.getvalue()) in {Reason.MALFORMED, Reason.TRAILING_BYTES, Reason.NOT_A_MAP}
    assert reason_of(decode_job, payload) in {Reason.MALFORMED, Reason.TRAILING_BYTES, Reason.NOT_A_MAP}
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_bool_bytes_must_be_zero_or_one() -> None:
    data = bytes([0, 1, 2])
    meta = TensorMeta(digest=tensor_digest(data), dtype="bool", shape=(3,))
    assert reason_of(blob_to_tensor, meta, data) == Reason.BAD_ARGUMENT


# --- op resolution ---------------------------------------------------------------------------------------------------


def test_every_allowed_op_resolves_in_this_torch() -> None:
    for name in ALLOWED_OPS:
        assert str(resolve_op(name)) == name


@pytest.mark.parametrize(
    "name", ["aten.rand.default", "aten.add_.Tensor", "aten.__class__.default", "builtins.eval", "aten.add", ""]
)
def test_unknown_ops_are_refused(name: str) -> None:
    assert reason_of(resolve_op, name) == Reason.UNKNOWN_OP
    x = torch.ones(2)
    spec, blobs = job([Node(op=name, args=(InputRef(0),))], [NodeRef(0)], x)
    assert reason_of(dry_run, spec) == Reason.UNKNOWN_OP
    assert reason_of(execute, spec, blobs) == Reason.UNKNOWN_OP


# --- execution -------------------------------------------------------------------------------------------------------


def test_execute_runs_a_hand_written_graph() -> None:
    x = torch.randn(3, 4)
    nodes = [
        Node(op="aten.permute.default", args=(InputRef(0), (1, 0))),
        Node(op="aten.mm.default", args=(InputRef(0), NodeRef(0))),
        Node(op="aten.split_with_sizes.default", args=(NodeRef(1), (1, 2))),
        Node(
            op="aten.full.default",
            args=((2, 3), 0.5),
            kwargs=(("device", Device()), ("dtype", DType("float64")), ("pin_memory", False)),
        ),
        Node(
            op="aten.clone.default",
            args=(NodeRef(2, 1),),
            kwargs=(("memory_format", MemoryFormat("contiguous_format")),),
        ),
    ]
    spec, blobs = job(nodes, [NodeRef(2, 0), NodeRef(3), NodeRef(4), InputRef(0)], x)
    spec = decode_job(encode_job(spec))
    assert check_memory(spec, memory_limit=MIB) > 0
    first, full, rest, same = execute(spec, blobs)
    prod = x @ x.t()
    assert torch.equal(first, prod[:1]) and torch.equal(rest, prod[1:]) and torch.equal(same, x)
    assert full.dtype == torch.float64 and torch.equal(full, torch.full((2, 3), 0.5, dtype=torch.float64))


def test_missing_and_mismatched_tensors() -> None:
    x = torch.ones(4)
    spec, blobs = job([Node(op="aten.relu.default", args=(InputRef(0),))], [NodeRef(0)], x)
    assert reason_of(execute, spec, {}) == Reason.MISSING_TENSOR
    (digest,) = blobs
    assert reason_of(execute, spec, {digest: blobs[digest][:-4]}) == Reason.SHAPE_MISMATCH
    assert reason_of(execute, spec, {digest: bytes(16)}) == Reason.HASH_MISMATCH


@pytest.mark.parametrize(
    "node",
    [
        Node(op="aten.view.default", args=(InputRef(0), (5,))),  # wrong element count
        Node(op="aten.relu.default", args=(DType("float32"),)),  # a dtype where a tensor goes
        Node(op="aten.relu.default", args=(InputRef(0), 1, 2)),  # too many positional arguments
        Node(op="aten.relu.default", args=(InputRef(0),), kwargs=(("out", InputRef(0)),)),  # unknown keyword
        Node(op="aten.sum.dim_IntList", args=(InputRef(0), (7,))),  # dimension out of range
        Node(op="aten.full.default", args=((1 << 62, 1 << 62), 0.0)),  # element count overflows
    ],
)
def test_bad_arguments_are_caught_on_the_meta_device(node: Node) -> None:
    spec, _ = job([node], [NodeRef(0)], torch.ones(4))
    assert reason_of(dry_run, spec) == Reason.BAD_ARGUMENT


def test_item_beyond_a_variable_length_result() -> None:
    nodes = [Node(op="aten.split_with_sizes.default", args=(InputRef(0), (2, 2)))]
    spec, blobs = job(nodes, [NodeRef(0, 2)], torch.ones(4))
    assert reason_of(dry_run, spec) == Reason.BAD_GRAPH
    assert reason_of(execute, spec, blobs) == Reason.BAD_GRAPH


# --- limits ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "node",
    [
        Node(op="aten.empty.memory_format", args=((10**12,),), kwargs=(("device", Device()),)),
        Node(op="aten.empty.memory_format", args=((10**12,),)),  # no device: still created on meta
        Node(op="aten.full.default", args=((10**6, 10**6), 1.0)),
        Node(op="aten.arange.default", args=(10**12,)),
        Node(op="aten.full_like.default", args=(InputRef(0), 1.0)),
    ],
)
def test_huge_creation_ops_are_refused_without_allocating(node: Node) -> None:
    spec, _ = job([node], [NodeRef(0)], torch.ones(1))
    limits = JobLimits(max_tensor_bytes=1 if node.op == "aten.full_like.default" else 1 << 30)
    assert reason_of(check_memory, spec, memory_limit=1 << 40, limits=limits) == Reason.TENSOR_TOO_LARGE


def test_expand_is_free_but_materialising_it_is_not() -> None:
    nodes = [
        Node(op="aten.expand.default", args=(InputRef(0), (1 << 20, 1 << 20))),
        Node(op="aten.sum.default", args=(NodeRef(0),)),
    ]
    spec, _ = job(nodes, [NodeRef(1)], torch.ones(1 << 20))
    assert check_memory(spec, memory_limit=16 * MIB) == 4 * MIB + 4
    spec, _ = job([nodes[0], Node(op="aten.clone.default", args=(NodeRef(0),))], [NodeRef(1)], torch.ones(1 << 20))
    assert reason_of(check_memory, spec, memory_limit=1 << 50) == Reason.TENSOR_TOO_LARGE


def test_peak_counts_live_storages_once_and_frees_dead_ones() -> None:
    x = torch.ones(256, 256)  # 256 KiB
    nodes = [
        Node(op="aten.view.default", args=(InputRef(0), (-1,))),  # shares x's storage
        Node(op="aten.neg.default", args=(NodeRef(0),)),  # +256 KiB
        Node(op="aten.exp.default", args=(NodeRef(1),)),  # +256 KiB, then node 1 dies
        Node(op="aten.abs.default", args=(NodeRef(2),)),  # +256 KiB, then node 2 dies
    ]
    spec, blobs = job(nodes, [NodeRef(3)], x)
    assert check_memory(spec, memory_limit=MIB) == 3 * 256 * 1024
    assert reason_of(check_memory, spec, memory_limit=700 * 1024) == Reason.MEMORY_LIMIT
    (out,) = execute(spec, blobs)
    assert torch.equal(out, x.view(-1).neg().exp().abs())


def test_outputs_over_the_limit() -> None:
    nodes = [Node(op="aten.full.default", args=((1024, 1024), 1.0), kwargs=(("device", Device()),))]
    spec, _ = job(nodes, [NodeRef(0), NodeRef(0)], torch.ones(1))
    assert dry_run(spec).output_bytes == 8 * MIB
    assert reason_of(dry_run, spec, limits=JobLimits(max_output_bytes=6 * MIB)) == Reason.OUTPUT_TOO_LARGE


def test_a_graph_over_the_op_limit_is_refused() -> None:
    x = {"digest": bytes(32), "dtype": "float32", "shape": [1]}
    nodes = [{"op": "aten.relu.default", "args": [{"input": 0}], "kwargs": {}}] * 10_001
    wire = {
        "version": 1,
        "inputs": [x],
        "constants": [],
        "nodes": nodes,
        "outputs": [{"node": 0}],
        "limits": to_wire(JobLimits(max_ops=1_000_000)),
        "compare": {"mode": "exact", "rtol": 0.0, "atol": 0.0},
    }
    assert reason_of(decode_job, codec.pack(wire)) == Reason.TOO_MANY_OPS

"""Turn a PyTorch function or module into a job: ``torch.export``, core ATen decompositions, then the op graph.

The client side of specs/job-format.md: the exported program's parameters, buffers and lifted constants become the
job's constants, the example inputs its inputs, every call of an allow-listed ATen overload a :class:`Node`.
Anything the job format cannot say (an op outside the allow-list, dynamic shapes, non-tensor inputs or outputs,
in-place state updates) raises :class:`JobError` with reason ``not_exportable``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind, OutputKind

from p2pcompute.compute.interpreter import NAME_BY_DTYPE, tensor_to_blob
from p2pcompute.core.jobspec import (
    ALLOWED_OPS,
    DEFAULT_JOB_LIMITS,
    OP_SCHEMAS,
    TUPLE_OPS,
    Arg,
    ArgType,
    Comparison,
    ConstRef,
    Device,
    DType,
    InputRef,
    JobLimits,
    JobSpec,
    Layout,
    MemoryFormat,
    Node,
    NodeRef,
    TensorRef,
    encode_bundle,
    encode_job,
    job_digest,
)
from p2pcompute.core.tensors import TensorMeta
from p2pcompute.errors import JobError, P2PComputeError, Reason

__all__ = ["ExportedJob", "export_job", "export_train_step", "trainable_names"]

_SKIPPED_OPS = frozenset({"aten._assert_tensor_metadata.default", "aten._assert_scalar.default"})
_SCALAR_OVERLOADS = {
    **{
        (f"aten.{name}.Tensor", "other"): f"aten.{name}.Scalar"
        for name in ("add", "sub", "mul", "div", "eq", "ne", "lt", "le", "gt", "ge", "remainder", "fmod")
    },
    ("aten.pow.Tensor_Tensor", "exponent"): "aten.pow.Tensor_Scalar",
    ("aten.pow.Tensor_Tensor", "self"): "aten.pow.Scalar",
}
"""A number where an op takes a ``Tensor`` (torch wraps it in a 0-dim tensor): the overload taking a ``Scalar`` there,
which computes exactly the same (the ``.Scalar`` overloads wrap their number the same way)."""
_MEMORY_FORMAT_NAMES = {
    torch.contiguous_format: "contiguous_format",
    torch.preserve_format: "preserve_format",
    torch.channels_last: "channels_last",
}


@dataclass(frozen=True)
class ExportedJob:
    """An exported job: the spec, its canonical bytes and digest, and the blob of every input and constant."""

    spec: JobSpec
    spec_bytes: bytes
    digest: bytes
    blobs: dict[bytes, bytes]

    def bundle(self) -> bytes:
        """The job as one self-contained file (specs/job-format.md §9)."""
        return encode_bundle(self.spec_bytes, self.blobs)

    def with_inputs(self, *inputs: torch.Tensor) -> ExportedJob:
        """The same graph and constants run on other inputs of the same dtypes and shapes."""
        if len(inputs) != len(self.spec.inputs):
            raise JobError(Reason.NOT_EXPORTABLE, f"{len(inputs)} inputs, the job takes {len(self.spec.inputs)}")
        metas, blobs = [], {meta.digest: self.blobs[meta.digest] for meta in self.spec.constants}
        for i, (tensor, old) in enumerate(zip(inputs, self.spec.inputs, strict=True)):
            meta, blob = _blob(tensor, f"input {i}")
            if (meta.dtype, meta.shape) != (old.dtype, old.shape):
                raise JobError(
                    Reason.NOT_EXPORTABLE,
                    f"input {i} is {meta.dtype}{list(meta.shape)}, the job takes {old.dtype}{list(old.shape)}",
                )
            metas.append(meta)
            blobs[meta.digest] = blob
        return _finish(replace(self.spec, inputs=tuple(metas)), blobs)


class _Wrapped(nn.Module):
    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> Any:
        return self.fn(*args)


def export_job(
    fn_or_module: nn.Module | Callable[..., Any],
    example_inputs: tuple[torch.Tensor, ...],
    *,
    compare: Comparison | None = None,
    limits: JobLimits = DEFAULT_JOB_LIMITS,
) -> ExportedJob:
    """Export ``fn_or_module`` called on ``example_inputs`` as a job (static shapes; a module runs in its mode)."""
    module = fn_or_module if isinstance(fn_or_module, nn.Module) else _Wrapped(fn_or_module)
    if not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise JobError(Reason.NOT_EXPORTABLE, "every example input must be a tensor")
    try:
        program = torch.export.export(module, tuple(example_inputs)).run_decompositions()
    except P2PComputeError:
        raise
    except Exception as exc:  # torch.export raises many types (UserError, Unsupported, RuntimeError ...)
        raise JobError(Reason.NOT_EXPORTABLE, f"torch.export failed: {str(exc)[:500]}") from exc
    return _Builder(program, example_inputs).build(compare or Comparison(), limits)


def trainable_names(model: nn.Module) -> tuple[str, ...]:
    """The names of ``model``'s trainable parameters (``requires_grad``), in ``named_parameters()`` order: the
    order in which a training step job takes them as inputs and returns their gradients."""
    return tuple(name for name, param in model.named_parameters() if param.requires_grad)


class _TrainStep(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor], model_inputs: int) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.model_inputs = model_inputs

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.model(*args[: self.model_inputs])
        return self.loss_fn(out, *args[self.model_inputs :])


def export_train_step(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    example_inputs: tuple[torch.Tensor, ...],
    *,
    targets: int = 1,
    compare: Comparison | None = None,
    limits: JobLimits = DEFAULT_JOB_LIMITS,
) -> ExportedJob:
    """Export one training step of ``model`` as a job whose outputs are the loss and the gradients.

    The loss is ``loss_fn(model(*example_inputs[:-targets]), *example_inputs[-targets:])`` (``targets`` trailing
    inputs go to the loss, not the model), a 0-dimensional floating tensor. The job's inputs are the model's
    trainable parameters (:func:`trainable_names` order), then ``example_inputs``; its outputs the loss, then the
    gradient of each trainable parameter in the same order. Frozen parameters and buffers are constants.

    The joint graph comes from ``torch.export.export`` and ``torch.export.experimental._export_forward_backward``
    (forward and backward traced by AOTAutograd into one graph, decomposed to core ATen ops; specs/job-format.md
    §4.1 says why this API). The module runs in its own mode: a model whose forward updates buffers (batch norm in
    ``train()``) or draws random numbers (dropout in ``train()``) is not exportable.
    """
    if not isinstance(model, nn.Module):
        raise JobError(Reason.NOT_EXPORTABLE, "a training step needs an nn.Module (its parameters are trained)")
    if not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise JobError(Reason.NOT_EXPORTABLE, "every example input must be a tensor")
    if not 0 <= targets < len(example_inputs):
        raise JobError(Reason.NOT_EXPORTABLE, f"{targets} targets of {len(example_inputs)} example inputs")
    names = trainable_names(model)
    if not names:
        raise JobError(Reason.NOT_EXPORTABLE, "the model has no trainable parameters")
    step = _TrainStep(model, loss_fn, len(example_inputs) - targets)
    try:
        from torch.export.experimental import _export_forward_backward

        program = _export_forward_backward(torch.export.export(step, tuple(example_inputs)), joint_loss_index=0)
    except P2PComputeError:
        raise
    except Exception as exc:  # torch.export and AOTAutograd raise many types
        raise JobError(Reason.NOT_EXPORTABLE, f"exporting the training step failed: {str(exc)[:500]}") from exc
    builder = _Builder(program, tuple(example_inputs), trained=tuple(f"model.{name}" for name in names))
    return builder.build(compare or Comparison(), limits)


class _Builder:
    def __init__(
        self,
        program: torch.export.ExportedProgram,
        example_inputs: tuple[torch.Tensor, ...],
        *,
        trained: tuple[str, ...] | None = None,
    ) -> None:
        self.program = program
        self.example_inputs = example_inputs
        self.trained = trained  # a training step: these parameters are the first inputs, their gradients outputs
        self.refs: dict[fx.Node, TensorRef] = {}
        self.nodes: list[Node] = []
        self.blobs: dict[bytes, bytes] = {}

    def build(self, compare: Comparison, limits: JobLimits) -> ExportedJob:
        allowed = (
            (OutputKind.LOSS_OUTPUT, OutputKind.GRADIENT_TO_PARAMETER)
            if self.trained is not None
            else (OutputKind.USER_OUTPUT,)
        )
        for output in self.program.graph_signature.output_specs:
            if output.kind not in allowed:
                raise JobError(
                    Reason.NOT_EXPORTABLE,
                    f"the program updates state ({output.kind.name}); export the module in eval()"
                    + (" or use group or layer norm" if self.trained is not None else ""),
                )
        inputs, constants = self._placeholders()
        outputs: tuple[TensorRef, ...] = ()
        for fx_node in self.program.graph.nodes:
            if fx_node.op == "call_function":
                self._call(fx_node)
            elif fx_node.op == "output":
                outputs = self._outputs(fx_node)
            elif fx_node.op != "placeholder":
                raise JobError(Reason.NOT_EXPORTABLE, f"graph node kind {fx_node.op!r} is not supported")
        spec = JobSpec(
            inputs=inputs,
            constants=constants,
            nodes=tuple(self.nodes),
            outputs=outputs,
            limits=limits,
            compare=compare,
        )
        return _finish(spec, self.blobs)

    def _placeholders(self) -> tuple[tuple[TensorMeta, ...], tuple[TensorMeta, ...]]:
        signature = self.program.graph_signature
        placeholders = [n for n in self.program.graph.nodes if n.op == "placeholder"]
        trained = self.trained or ()
        inputs: dict[int, TensorMeta] = {}
        constants: list[TensorMeta] = []
        user = iter(enumerate(self.example_inputs, start=len(trained)))
        for fx_node, spec in zip(placeholders, signature.input_specs, strict=True):
            if spec.kind == InputKind.USER_INPUT:
                index, tensor = next(user, (0, None))
                if tensor is None:  # pragma: no cover - torch.export keeps the inputs it was given
                    raise JobError(Reason.NOT_EXPORTABLE, "the program takes more inputs than were given")
                meta, blob = _blob(tensor, f"input {index}")
                self.refs[fx_node] = InputRef(index)
                inputs[index] = meta
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                assert spec.target is not None
                if spec.target in self.program.state_dict:
                    tensor = self.program.state_dict[spec.target]
                else:
                    tensor = self.program.constants[spec.target]
                if not isinstance(tensor, torch.Tensor):
                    raise JobError(Reason.NOT_EXPORTABLE, f"constant {spec.target!r} is not a tensor")
                if spec.kind == InputKind.PARAMETER and spec.target in trained:
                    index = trained.index(spec.target)
                    meta, blob = _blob(tensor, f"parameter {spec.target!r}")
                    self.refs[fx_node] = InputRef(index)
                    inputs[index] = meta
                else:
                    meta, blob = _blob(tensor, f"constant {spec.target!r}")
                    self.refs[fx_node] = ConstRef(len(constants))
                    constants.append(meta)
            else:
                raise JobError(Reason.NOT_EXPORTABLE, f"input kind {spec.kind.name} is not supported")
            self.blobs[meta.digest] = blob
        if sorted(inputs) != list(range(len(inputs))):  # pragma: no cover - every trained parameter is lifted
            raise JobError(Reason.NOT_EXPORTABLE, "a trained parameter is not an input of the program")
        return tuple(inputs[i] for i in range(len(inputs))), tuple(constants)

    def _call(self, fx_node: fx.Node) -> None:
        target = fx_node.target
        if target is operator.getitem:
            source, item = fx_node.args
            base = self.refs.get(source) if isinstance(source, fx.Node) else None
            if not (isinstance(base, NodeRef) and base.item is None and isinstance(item, int)):
                raise JobError(Reason.NOT_EXPORTABLE, f"unsupported getitem {fx_node.format_node()}")
            self.refs[fx_node] = NodeRef(base.node, item)
            return
        if not isinstance(target, torch._ops.OpOverload):
            raise JobError(Reason.NOT_EXPORTABLE, f"call of {target!r} is not an ATen op")
        name = str(target)
        if name in _SKIPPED_OPS and not fx_node.users:
            return
        if name == "aten.empty_permuted.default":
            name, fx_args, fx_kwargs = self._empty_permuted(fx_node)
        else:
            fx_args, fx_kwargs = tuple(fx_node.args), dict(fx_node.kwargs)
        if name not in ALLOWED_OPS:
            raise JobError(Reason.NOT_EXPORTABLE, f"op {name} is not in the job format's allow-list")
        args = tuple(self._arg(a, fx_node) for a in fx_args)
        kwargs = tuple(sorted((key, self._arg(value, fx_node)) for key, value in fx_kwargs.items()))
        name, args, kwargs = self._wrap_numbers(name, args, kwargs, fx_node)
        self.refs[fx_node] = NodeRef(len(self.nodes))
        self.nodes.append(Node(op=name, args=args, kwargs=kwargs))  # tuple outputs are reached through getitem

    @staticmethod
    def _empty_permuted(fx_node: fx.Node) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
        """``empty_permuted(size, physical_layout)`` (uninitialised memory laid out in some order; backward graphs
        make one and fill it at once) is written ``full(size, 0)`` of its dtype: any values are an honest answer,
        zeros are deterministic, and the job format needs no uninitialised op more (specs/job-format.md §4)."""
        value = fx_node.meta.get("val")
        if not isinstance(value, torch.Tensor):  # pragma: no cover - torch.export records every value
            raise JobError(Reason.NOT_EXPORTABLE, f"{fx_node.name}: no dtype recorded")
        return "aten.full.default", (fx_node.args[0], 0), {"dtype": value.dtype}

    def _wrap_numbers(
        self, name: str, args: tuple[Arg, ...], kwargs: tuple[tuple[str, Arg], ...], fx_node: fx.Node
    ) -> tuple[str, tuple[Arg, ...], tuple[tuple[str, Arg], ...]]:
        """Numbers where the op takes a ``Tensor`` (the job format's ``Tensor`` takes tensor references only).

        torch.export leaves ``x * 2`` as ``mul.Tensor(x, 2)``: such a call becomes the ``.Scalar`` overload; a number
        elsewhere becomes a ``scalar_tensor`` node of the dtype torch would give the wrapped number.
        """
        schema = OP_SCHEMAS[name]
        positional = [p for p in schema.params if not p.kwarg_only]
        numbers = [
            param.name
            for param, value in [
                *zip(positional, args, strict=False),
                *((_schema_param(schema, k), v) for k, v in kwargs),
            ]
            if param.type is ArgType.TENSOR and not param.is_list and type(value) in (bool, int, float)
        ]
        if len(numbers) == 1 and (name, numbers[0]) in _SCALAR_OVERLOADS:
            return _SCALAR_OVERLOADS[name, numbers[0]], args, kwargs
        if not numbers:
            return name, args, kwargs
        floating = any(
            isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].is_floating_point()
            for a in fx_node.args
        )

        def wrap(param_name: str, value: Arg) -> Arg:
            if param_name not in numbers:
                return value
            assert isinstance(value, (bool, int, float))
            return self._scalar_tensor(value, floating=floating)

        new_args = tuple(wrap(p.name, v) for p, v in zip(positional, args, strict=False))
        return name, new_args, tuple((k, wrap(k, v)) for k, v in kwargs)

    def _scalar_tensor(self, value: bool | int | float, *, floating: bool) -> NodeRef:
        if isinstance(value, bool):
            dtype = torch.bool
        elif isinstance(value, int):
            dtype = torch.int64
        else:  # a float next to a floating tensor keeps full precision; next to integers it is the default dtype
            dtype = torch.float64 if floating else torch.get_default_dtype()
        self.nodes.append(
            Node(
                op="aten.scalar_tensor.default",
                args=(value,),
                kwargs=(("device", Device()), ("dtype", DType(NAME_BY_DTYPE[dtype]))),
            )
        )
        return NodeRef(len(self.nodes) - 1)

    def _arg(self, value: Any, where: fx.Node, *, in_list: bool = False) -> Arg:
        if isinstance(value, fx.Node):
            ref = self.refs.get(value)
            if ref is None:
                raise JobError(Reason.NOT_EXPORTABLE, f"{where.name}: argument {value.name} is not a tensor value")
            return ref
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, (list, tuple)) and not in_list:
            items = tuple(self._arg(v, where, in_list=True) for v in value)
            return items  # type: ignore[return-value]
        if isinstance(value, torch.dtype) and not in_list:
            name = NAME_BY_DTYPE.get(value)
            if name is None:
                raise JobError(Reason.NOT_EXPORTABLE, f"{where.name}: dtype {value} is not supported")
            return DType(name)
        if isinstance(value, torch.device) and not in_list:
            return Device()
        if isinstance(value, torch.layout) and value == torch.strided and not in_list:
            return Layout("strided")
        if isinstance(value, torch.memory_format) and value in _MEMORY_FORMAT_NAMES and not in_list:
            return MemoryFormat(_MEMORY_FORMAT_NAMES[value])
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise JobError(Reason.NOT_EXPORTABLE, f"{where.name}: dynamic shapes are not supported")
        raise JobError(Reason.NOT_EXPORTABLE, f"{where.name}: argument {value!r:.80} is not supported")

    def _outputs(self, fx_node: fx.Node) -> tuple[TensorRef, ...]:
        values = fx_node.args[0]
        if not isinstance(values, (tuple, list)):  # pragma: no cover - torch.export always returns a tuple
            raise JobError(Reason.NOT_EXPORTABLE, "the program's outputs are not a tuple")
        refs = []
        for value in values:
            ref = self.refs.get(value) if isinstance(value, fx.Node) else None
            if ref is None or (isinstance(ref, NodeRef) and ref.item is None and self.nodes[ref.node].op in TUPLE_OPS):
                raise JobError(Reason.NOT_EXPORTABLE, f"output {value!r:.80} is not a tensor")
            refs.append(ref)
        if self.trained is None:
            return tuple(refs)
        return self._train_outputs(values, refs)

    def _train_outputs(self, values: Any, refs: list[TensorRef]) -> tuple[TensorRef, ...]:
        """A training step's outputs in the job's order: the loss, then each trained parameter's gradient."""
        assert self.trained is not None
        loss: TensorRef | None = None
        gradients: dict[str, TensorRef] = {}
        for value, ref, spec in zip(values, refs, self.program.graph_signature.output_specs, strict=True):
            if spec.kind == OutputKind.LOSS_OUTPUT:
                val = value.meta.get("val")
                if not (isinstance(val, torch.Tensor) and val.dim() == 0 and val.is_floating_point()):
                    raise JobError(Reason.NOT_EXPORTABLE, "the loss must be a 0-dimensional floating tensor")
                loss = ref
            elif spec.target is not None:
                gradients[spec.target] = ref
        if loss is None:  # pragma: no cover - _export_forward_backward marks output 0 as the loss
            raise JobError(Reason.NOT_EXPORTABLE, "the program has no loss output")
        missing = [name.removeprefix("model.") for name in self.trained if name not in gradients]
        if missing:  # pragma: no cover - AOTAutograd refuses a parameter that receives no gradient first
            raise JobError(Reason.NOT_EXPORTABLE, f"parameters without a gradient (unused?): {missing[:8]}")
        return (loss, *(gradients[name] for name in self.trained))


def _schema_param(schema: Any, name: str) -> Any:
    """The parameter ``name`` of an op schema (a keyword the schema lacks is refused later, by ``encode_job``)."""
    for param in schema.params:
        if param.name == name:
            return param
    raise JobError(Reason.NOT_EXPORTABLE, f"{schema.name} has no argument {name!r}")


def _blob(tensor: torch.Tensor, what: str) -> tuple[TensorMeta, bytes]:
    if tensor.dtype not in NAME_BY_DTYPE:
        raise JobError(Reason.NOT_EXPORTABLE, f"{what}: dtype {tensor.dtype} is not supported")
    if tensor.layout != torch.strided or tensor.is_meta:
        raise JobError(Reason.NOT_EXPORTABLE, f"{what}: only dense tensors with data are supported")
    return tensor_to_blob(tensor)


def _finish(spec: JobSpec, blobs: Mapping[bytes, bytes]) -> ExportedJob:
    try:
        spec_bytes = encode_job(spec)
    except P2PComputeError as exc:
        raise JobError(Reason.NOT_EXPORTABLE, f"{exc.reason.value}: {exc.detail}") from exc
    return ExportedJob(spec=spec, spec_bytes=spec_bytes, digest=job_digest(spec_bytes), blobs=dict(blobs))

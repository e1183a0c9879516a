"""One registry for every op's fast paths (docs/design.md#adding-a-backend).

Each op family declares an `OpTable`: the forward and backward schemas (no backend argument), their fake
kernels, the op's one autograd rule, and its `Backend`s. `register(table)` builds, per backend,
`hope_kernels::<op>_<backend>` and `hope_kernels::<op>_<backend>_backward` with fake kernels and the same
autograd rule, and returns a `RegisteredOp` that resolves a backend name and calls the chosen op.

Resolution: an explicit `backend=` argument, else HOPE_KERNELS_BACKEND, else "auto". Auto takes, among the
backends listed for the tensors' device type that can run here (hope_kernels.dispatch), accept the inputs and
are preferred for them, the one of highest priority, else "reference" (the family's eager path, not a custom
op). An explicit backend that is not implemented, cannot run here, or refuses the inputs raises: never a silent
fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from hope_kernels import dispatch as D
from hope_kernels.dispatch import BackendUnavailableError


def _accepts_all(inputs: Any, device: torch.device) -> None:
    return None


def _prefers_all(inputs: Any) -> bool:
    return True


@dataclass(frozen=True)
class Backend:
    """One fast path of an op.

    forward / backward: take the table's forward / backward schema arguments and return its outputs.
    backward None: a composite of differentiable ops (autograd through its parts), called as it is, no custom op;
    its forward returns the outputs without the saved-for-backward-only ones.
    devices: the device types auto considers it for (an explicit choice only needs dispatch's availability).
    priority: auto's preference among the backends of a device type, highest first.
    accepts(inputs, device): None, or why it cannot take these inputs: a str (BackendUnavailableError when
    chosen explicitly) or an exception to raise as it is; auto passes over it either way.
    prefers(inputs): False where it runs but auto should pass over it (a slow case, e.g. register spills).
    fake: the fake forward when it differs from the table's (other saved-for-backward outputs).
    """

    name: str
    forward: Callable[..., Any]
    backward: Callable[..., Any] | None
    devices: tuple[str, ...]
    priority: int = 0
    accepts: Callable[[Any, torch.device], Any] = _accepts_all
    prefers: Callable[[Any], bool] = _prefers_all
    fake: Callable[..., Any] | None = None


@dataclass(frozen=True)
class OpTable:
    """An op's declaration. name: the custom ops' prefix; label: the name in error messages.
    schema / backward_schema: "(Tensor x, ...) -> (Tensor, ...)". setup_context(ctx, inputs, outputs) and
    backward(ctx, backward_op, *output_grads) -> input grads: the op's one autograd rule, backward_op the
    chosen backend's backward custom op. saved_only: how many trailing outputs exist for backward only
    (dropped by RegisteredOp.__call__)."""

    name: str
    label: str
    schema: str
    backward_schema: str
    fake: Callable[..., Any]
    fake_backward: Callable[..., Any]
    setup_context: Callable[..., None]
    backward: Callable[..., Any]
    backends: tuple[Backend, ...]
    saved_only: int = 0


def _outputs(out):
    return tuple(out) if isinstance(out, (list, tuple)) else out


class RegisteredOp:
    """The custom ops of one table: `.resolve(backend, tensors, inputs)` -> a backend name, and
    `op(name, *args)` -> the forward outputs without the saved-for-backward-only ones. `.ops[name]` and
    `.backward_ops[name]` are the custom ops themselves (opcheck, direct calls; not for composite backends)."""

    def __init__(self, table: OpTable):
        self.table = table
        self.by_name = {b.name: b for b in table.backends}
        self.auto_order = sorted(table.backends, key=lambda b: -b.priority)
        # the names a caller may choose (a table may also hold backends only tests and benchmarks call)
        self.supported = ("reference",) + tuple(n for n in self.by_name if n in D.BACKENDS)
        self.ops, self.backward_ops = {}, {}
        for b in table.backends:
            if b.backward is not None:
                self.ops[b.name], self.backward_ops[b.name] = _register_backend(table, b)

    def resolve(self, backend: str | None, tensors: Sequence[torch.Tensor | None], inputs: Any = None) -> str:
        """The backend for one call on `tensors`; `inputs` is what the backends' accepts() read."""
        op = self.table.label
        backend, source = D.requested_backend(backend, op)
        device = D._device_of(tensors)
        if backend == "auto":
            for b in self.auto_order:
                if (
                    device.type in b.devices
                    and D._available(b.name, device)
                    and b.prefers(inputs)
                    and b.accepts(inputs, device) is None
                ):
                    return b.name
            return "reference"
        if backend == "reference":
            return backend
        D.require_available(backend, source, device, op, self.supported)
        why = self.by_name[backend].accepts(inputs, device)
        if why is not None:
            raise why if isinstance(why, BaseException) else BackendUnavailableError(why)
        return backend

    def __call__(self, backend: str, *args):
        if backend not in self.ops:
            return self.by_name[backend].forward(*args)
        out = self.ops[backend](*args)
        return out[: len(out) - self.table.saved_only] if self.table.saved_only else out


def _register_backend(table: OpTable, b: Backend):
    name = f"hope_kernels::{table.name}_{b.name}"
    fwd = torch.library.custom_op(name, lambda *a: _outputs(b.forward(*a)), mutates_args=(), schema=table.schema)
    bwd = torch.library.custom_op(
        f"{name}_backward", lambda *a: _outputs(b.backward(*a)), mutates_args=(), schema=table.backward_schema
    )
    fwd.register_fake(b.fake or table.fake)
    bwd.register_fake(table.fake_backward)
    fwd.register_autograd(lambda ctx, *grads: table.backward(ctx, bwd, *grads), setup_context=table.setup_context)
    return fwd, bwd


def register(table: OpTable) -> RegisteredOp:
    """Create the custom ops of every backend in `table` (once per process: at the family's import)."""
    return RegisteredOp(table)

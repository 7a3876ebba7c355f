"""Virtual CUDA devices on a CPU build of torch: real values, CUDA's device rules, counted syncs.

``virtual_cuda(n)`` makes ``cuda:0`` .. ``cuda:{n-1}`` usable: a tensor moved or created there is
a ``VirtualTensor`` that reports that device and holds its values in a CPU tensor. Every op
checks CUDA's rule (all tensor operands on one device; a CPU operand only as a 0-dim scalar, or
as an index), so a stage's features meeting a probe on another GPU raise as on real hardware,
and ``.numpy()`` of a device tensor raises too. Ops that make the host wait for the device
(``.item()``/``bool()``, ``.tolist()``, copies to the CPU, ``nonzero``, boolean-mask indexing,
``bincount``, ``unique``...) are counted in ``VirtualCuda.syncs``, which the sync tests pin.
FakeTensorMode cannot do this: it has no values, so data-dependent ops (bincount, nonzero,
``.item()``) cannot run under it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten

# Ops that make the host wait for the device when an input is on it.
_SYNCING = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten.bincount,  # CUDA bincount reads the input's min/max back
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.is_nonzero,
    aten.equal,
    aten.histc,
}
# Ops that accept CPU index or source tensors beside device ones (as CUDA does).
_MIXED_OK = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_, aten.copy_}
_MIXED_OK |= {aten._to_copy, aten.to, aten.lift_fresh, aten.lift_fresh_copy}


class VirtualTensor(torch.Tensor):
    """A tensor on a virtual CUDA device; its values live in the CPU tensor ``inner``."""

    inner: torch.Tensor
    _mode: VirtualCuda | None = None

    @staticmethod
    def __new__(cls, inner: torch.Tensor, device: torch.device):
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            device=device,
            requires_grad=False,
        )
        out.inner = inner
        return out

    def __repr__(self) -> str:
        return f"VirtualTensor({self.inner!r}, device='{self.device}')"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a virtual CUDA tensor outside virtual_cuda()")

    # Python indexing takes a CUDA device guard, which a CPU build lacks: index the values.
    def _index(self, index):
        flat, _ = tree_flatten(index if isinstance(index, tuple) else (index,))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        for t in tensors:
            if isinstance(t, VirtualTensor) and t.device != self.device:
                raise RuntimeError(
                    "indices should be either on cpu or on the same device as the indexed "
                    f"tensor ({self.device}), got {t.device}"
                )
        if VirtualTensor._mode is not None and any(t.dtype == torch.bool for t in tensors):
            VirtualTensor._mode.count("boolean_mask_index")
        return tree_map(lambda t: t.inner if isinstance(t, VirtualTensor) else t, index)

    def __getitem__(self, index):
        out = self.inner[self._index(index)]
        return VirtualTensor(out, self.device)

    def __setitem__(self, index, value):
        if isinstance(value, VirtualTensor):
            if value.device != self.device:
                raise RuntimeError(f"cannot assign a {value.device} tensor into {self.device}")
            value = value.inner
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            raise RuntimeError(f"cannot assign a cpu tensor into {self.device} without .to()")
        self.inner[self._index(index)] = value

    def contiguous(self, memory_format=torch.contiguous_format):  # binding: a device guard
        if self.inner.is_contiguous(memory_format=memory_format):
            return self
        return aten.clone.default(self, memory_format=memory_format)

    def new_tensor(self, data, dtype=None, device=None, requires_grad=False):  # a guard too
        out = torch.as_tensor(data, dtype=dtype or self.dtype)
        return out.to(self.device if device is None else device)

    def __invert__(self):  # the binding takes a device guard
        return aten.bitwise_not.default(self)

    def nonzero(self, *, as_tuple: bool = False):  # the Python binding takes a device guard
        out = aten.nonzero.default(self)
        return out.unbind(1) if as_tuple else out

    def _scalar(self):  # Python scalars of a device tensor: a sync
        if VirtualTensor._mode is not None:
            VirtualTensor._mode.count("_local_scalar_dense")
        return self.inner

    def item(self):
        return self._scalar().item()

    def __int__(self):
        return int(self._scalar())

    def __index__(self):
        return self._scalar().__index__()

    def __float__(self):
        return float(self._scalar())

    def __bool__(self):
        return bool(self._scalar())

    def tolist(self):  # torch refuses tolist() on subclasses; on CUDA it is a sync
        if VirtualTensor._mode is not None:
            VirtualTensor._mode.count("tolist")
        return self.inner.tolist()

    def numpy(self, *, force: bool = False):
        raise TypeError(
            f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to copy "
            "the tensor to host memory first."
        )

    def __array__(self, dtype=None, copy=None):
        return self.numpy()


def _device_of(t: torch.Tensor) -> torch.device:
    return t.device if isinstance(t, VirtualTensor) else torch.device("cpu")


class VirtualCuda(TorchDispatchMode):
    """The dispatch mode behind ``virtual_cuda``; ``syncs`` counts host syncs by op name."""

    def __init__(self):
        super().__init__()
        self.syncs: Counter[str] = Counter()

    def count(self, name: str) -> None:
        self.syncs[name] += 1

    @property
    def total(self) -> int:
        return sum(self.syncs.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        packet = func.overloadpacket
        if packet in (aten._pin_memory, aten.pin_memory):
            return args[0]
        if packet is aten.is_pinned:
            return True
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        on_device = {t.device for t in tensors if isinstance(t, VirtualTensor)}
        target = kwargs.get("device")
        positional = [i for i, a in enumerate(args) if isinstance(a, torch.device)]
        if target is None and positional:
            target = args[positional[0]]
        target = None if target is None else torch.device(target)
        moves = packet in (aten._to_copy, aten.to)
        if moves or (target is not None and not tensors):
            out_device = target if target is not None else _device_of(args[0])
            if moves and on_device and out_device.type == "cpu":
                self.count("copy_to_cpu")
        elif packet is aten.copy_:
            out_device = _device_of(args[0])
            if out_device.type == "cpu" and on_device:
                self.count("copy_to_cpu")
        else:
            host = [t for t in tensors if not isinstance(t, VirtualTensor) and t.dim() > 0]
            if len(on_device) > 1 or (on_device and host and packet not in _MIXED_OK):
                found = sorted(str(d) for d in on_device | {_device_of(t) for t in host})
                raise RuntimeError(
                    "Expected all tensors to be on the same device, but found at least two "
                    f"devices, {found[0]} and {found[1]}! (in {func})"
                )
            out_device = next(iter(on_device), torch.device("cpu"))
            if on_device and packet in _SYNCING:
                self.count(packet.__name__)
            elif on_device and packet in (aten.index, aten.index_put, aten.index_put_):
                indices = args[1]
                if any(i is not None and i.dtype == torch.bool for i in indices):
                    self.count("boolean_mask_index")
            elif on_device and packet is aten.repeat_interleave and "output_size" not in kwargs:
                self.count("repeat_interleave")
        if target is not None:
            if "device" in kwargs:
                kwargs["device"] = torch.device("cpu")
            args = tuple(torch.device("cpu") if i in positional else a for i, a in enumerate(args))
        wrappers = {id(t.inner): t for t in tensors if isinstance(t, VirtualTensor)}

        def unwrap(t):
            return t.inner if isinstance(t, VirtualTensor) else t

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if out_device.type == "cpu":
            return out

        def wrap(t):
            if not isinstance(t, torch.Tensor):
                return t
            same = wrappers.get(id(t))  # in place: the operand itself
            return VirtualTensor(t, out_device) if same is None else same

        return tree_map(wrap, out)


def _one_hot(t: torch.Tensor, num_classes: int = -1) -> torch.Tensor:
    """``F.one_hot`` through ops the mode sees (its kernel takes a CUDA device guard)."""
    if num_classes < 0:
        num_classes = int(t.max()) + 1  # a sync, as on CUDA
    out = torch.zeros(*t.shape, num_classes, dtype=torch.int64, device=t.device)
    return out.scatter_(-1, t.unsqueeze(-1), 1)


@contextmanager
def virtual_cuda(n: int = 2) -> Iterator[VirtualCuda]:
    """``cuda:0`` .. ``cuda:{n-1}`` on a CPU build (see the module docstring); yields the mode,
    whose ``syncs`` counts host syncs."""
    mode = VirtualCuda()
    real_tensor = torch.tensor

    def tensor(data, *args, device=None, **kwargs):  # torch.tensor bypasses the mode
        out = real_tensor(data, *args, **kwargs)
        return out if device is None else out.to(device)

    with ExitStack() as stack:
        stack.enter_context(mock.patch("torch.cuda._lazy_init", return_value=None))
        stack.enter_context(mock.patch("torch.cuda.is_available", return_value=True))
        stack.enter_context(mock.patch("torch.cuda.device_count", return_value=n))
        stack.enter_context(mock.patch("torch.tensor", tensor))
        stack.enter_context(mock.patch("torch.nn.functional.one_hot", _one_hot))
        stack.enter_context(mock.patch.object(VirtualTensor, "_mode", mode))
        stack.enter_context(mode)
        yield mode

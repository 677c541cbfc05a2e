"""Peak bytes of live tensor storages, measured op by op (any device, CPU included).

A :class:`LiveTensorProbe` is a ``TorchDispatchMode``: every tensor an operator returns while it is
active is looked at, each storage not seen before is counted once (views share their storage) and a
weak reference removes it from the count when the storage is freed. Tensors that already exist when
the probe starts (weights, optimizer state, quantization constants) are counted through
:meth:`LiveTensorProbe.add_roots`. ``peak_bytes`` is the largest total seen after any operator:
what an allocator with no caching and no fragmentation would need, i.e. the quantity a memory plan
estimates before a device's allocator overhead is added. Everything runs in the calling thread
(autograd's CPU backward included), so one probe sees the whole training step.

It is slow (a Python call per operator): meant for tests and measurements of small models.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_of(t: torch.Tensor) -> torch.UntypedStorage | None:
    if t.is_meta or getattr(t, "is_nested", False):
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some wrapper subclasses)
        return None


class LiveTensorProbe(TorchDispatchMode):
    """Tracks the bytes of live tensor storages; ``peak_bytes`` is the maximum seen.

    ``device`` (e.g. ``"cpu"``) limits the count to storages on that device type; None counts all.
    """

    def __init__(self, device: str | None = None, *, detail: bool = False) -> None:
        super().__init__()
        self.device = device
        self.detail = detail
        self.live: dict[int, tuple[int, Any]] = {}  # storage address (_cdata) -> (nbytes, weakref)
        self.origin: dict[int, str] = {}  # with detail: storage address -> operator that made it
        self.peak_detail: dict[str, int] = {}  # with detail: bytes at the peak by making operator
        self.current_bytes = 0
        self.peak_bytes = 0
        self.samples: list[tuple[str, int]] = []  # (label, current_bytes) marks, see mark()
        self.peak_op: str | None = None
        self._op = "root"

    # ----------------------------------------------------------------- bookkeeping
    def _forget(self, key: int, ref: Any) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[1] is ref:
            del self.live[key]
            self.current_bytes -= entry[0]

    def _track(self, t: torch.Tensor) -> None:
        if self.device is not None and t.device.type != self.device:
            return
        st = _storage_of(t)
        if st is None:
            return
        key = st._cdata
        nbytes = int(st.nbytes())
        entry = self.live.get(key)
        if entry is not None:
            if entry[0] != nbytes:  # resized in place
                self.current_bytes += nbytes - entry[0]
                self.live[key] = (nbytes, entry[1])
            return
        ref: weakref.ref[torch.UntypedStorage] = weakref.ref(st, partial(self._forget, key))
        self.live[key] = (nbytes, ref)
        self.current_bytes += nbytes
        if self.detail:
            self.origin[key] = f"{self._op} {tuple(t.shape)} {t.dtype}".replace("torch.", "")

    def _update_peak(self, label: str) -> None:
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self.peak_op = label
            if self.detail:
                by_origin: dict[str, int] = {}
                for key, (nbytes, _) in self.live.items():
                    name = self.origin.get(key, "?")
                    by_origin[name] = by_origin.get(name, 0) + nbytes
                self.peak_detail = by_origin

    def add_roots(self, objects: Iterable[Any]) -> None:
        """Count tensors that exist already: modules (parameters, buffers, gradients, tensors held in
        attributes such as 4-bit quantization state), optimizers (state), tensors and containers."""
        seen: set[int] = set()
        for obj in objects:
            self._add(obj, seen, depth=0)
        self._update_peak("roots")

    def _add(self, obj: Any, seen: set[int], depth: int) -> None:
        if id(obj) in seen or depth > 6:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            self._track(obj)
            if obj.grad is not None:
                self._track(obj.grad)
            for value in getattr(obj, "__dict__", {}).values():  # e.g. Params4bit.quant_state
                self._add(value, seen, depth + 1)
            return
        if isinstance(obj, torch.nn.Module):
            for module in obj.modules():
                for value in list(module._parameters.values()) + list(module._buffers.values()):
                    if value is not None:
                        self._add(value, seen, depth + 1)
                for key, value in vars(module).items():
                    if not key.startswith("_"):
                        self._add(value, seen, depth + 1)
            return
        if isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                self._add(state, seen, depth + 1)
            return
        if isinstance(obj, dict):
            for value in obj.values():
                self._add(value, seen, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                self._add(value, seen, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("bitsandbytes"):
            for value in vars(obj).values():
                self._add(value, seen, depth + 1)

    def mark(self, label: str) -> None:
        """Record the current total under ``label`` (e.g. after the forward)."""
        self.samples.append((label, self.current_bytes))

    def reset_peak(self) -> None:
        """Start a new peak from the current total (e.g. after a warm-up step)."""
        self.peak_bytes = self.current_bytes
        self.peak_op = None

    # ----------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self._op = str(func)
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                self._track(t)
        # in-place ops and out= variants may resize their first argument's storage
        if flat and isinstance(args, tuple) and args and isinstance(args[0], torch.Tensor):
            self._track(args[0])
        self._update_peak(str(func))
        return out


def measure_training_peak(
    model: torch.nn.Module, training_args: Any, train_dataset: Any, collator: Any, *, detail: bool = False
) -> dict[str, Any]:
    """Run ``training_args.max_steps`` steps of :class:`~xcft.train.trainer.XcftTrainer` under a probe.

    Returns ``peak_bytes`` (live tensor storages at the peak, weights and optimizer state included),
    ``start_bytes`` (what existed before the run: the model) and ``peak_op`` (the operator after
    which the peak was seen). Run two steps or more so that the optimizer state exists during a
    forward, as it does in every step after the first.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from xcft.train.trainer import XcftTrainer

    trainer = XcftTrainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=collator)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    probe = LiveTensorProbe(device="cpu", detail=detail)
    probe.add_roots([model])
    start = probe.current_bytes
    with probe:
        trainer.train()
    out: dict[str, Any] = {"peak_bytes": probe.peak_bytes, "start_bytes": start, "peak_op": probe.peak_op}
    if detail:
        out["peak_detail"] = dict(sorted(probe.peak_detail.items(), key=lambda kv: -kv[1]))
    return out


__all__ = ["LiveTensorProbe", "measure_training_peak"]

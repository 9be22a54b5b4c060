"""The snapshot's tree: a state's nested dicts, lists and scalars with each tensor in
its place in a slot's layout (checkpoint/snapshot.py). The walk that copies a state's
structure and collects its tensors for the capture, and the copies and paths of a tree
that `restore` and `verify` use.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from splice.checkpoint.checksum import Signature, _Layout
from splice.checkpoint.shm import Frozen

_SCALARS = (int, float, str, bool, bytes, type(None), Frozen)


class _Pending:
    """Stands for a tensor whose place in a new layout is not known yet."""


_PENDING = _Pending()


class _Capture:
    """One capture's walk: the sources in walk order, and where each goes (the slot's
    current layout if the state still fits it). CUDA tensors of `gpu` (the device whose
    copies go asynchronously through `device_copy`; None: no such copies) take their
    place in the layout like CPU ones but are collected apart."""

    __slots__ = ("signature", "old", "views", "srcs", "src_idx", "gpu", "dev_idx",
                 "dev_srcs", "others", "num_bytes", "fits")

    def __init__(self, layout: _Layout | None, gpu: torch.device | None = None) -> None:
        self.signature: Signature = []
        self.old: Signature = layout.signature if layout is not None else []
        self.views = layout.views if layout is not None else []
        self.srcs: list[torch.Tensor] = []
        self.src_idx: list[int] = []  # walk indices of `srcs`
        self.gpu = gpu
        self.dev_idx: list[int] = []
        self.dev_srcs: list[torch.Tensor] = []
        self.others: dict[int, torch.Tensor] = {}  # by walk index: tensors off the CPU
        self.num_bytes = 0
        self.fits = layout is not None

    def tensor(self, value: torch.Tensor) -> Any:
        self.num_bytes += value.nbytes
        i = len(self.signature)
        on_gpu = (self.gpu is not None and value.device == self.gpu
                  and value.layout == torch.strided)
        if not on_gpu and (not value.is_cpu or value.layout != torch.strided):
            self.signature.append(None)
            self.others[i] = clone = value.detach().clone()
            return clone
        sig = (value.shape, value.dtype)
        self.signature.append(sig)
        if on_gpu:
            self.dev_idx.append(i)
            self.dev_srcs.append(value.detach())
        else:
            self.src_idx.append(i)
            self.srcs.append(value.detach() if value.requires_grad else value)
        if self.fits:
            if i < len(self.views) and self.old[i] == sig:
                return self.views[i]
            self.fits = False
        return _PENDING

    def done(self) -> bool:
        """Whether every tensor found its place in the current layout."""
        return self.fits and len(self.signature) == len(self.views)


_SCALAR_TYPES = frozenset(_SCALARS)
_DICTS = frozenset({dict, OrderedDict})


def _copy_into(value: Any, cap: _Capture) -> Any:
    """Deep-copy `value`'s structure, each tensor replaced by its place in the slot.
    (Exact-type checks first: this walk runs every step, over every optimizer setting.)"""
    kind = type(value)
    if kind in _SCALAR_TYPES:
        return value
    if kind in _DICTS:
        return {k: _copy_into(v, cap) for k, v in value.items()}
    if kind is torch.Tensor or isinstance(value, torch.Tensor):
        return cap.tensor(value)
    if kind is list:
        return [_copy_into(v, cap) for v in value]
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, Mapping):
        return {k: _copy_into(v, cap) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_copy_into(v, cap) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return copy.deepcopy(value)


def _place(value: Any, views: Iterator[torch.Tensor | None]) -> Any:
    """`value` (a tree from `_copy_into`) with every tensor moved into a new layout."""
    if value is _PENDING or isinstance(value, torch.Tensor):
        view = next(views)
        return value if view is None else view
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, dict):
        return {k: _place(v, views) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_place(v, views) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _clone(value: Any) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, Mapping):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return copy.deepcopy(value)


def _clone_kept(value: Any, keep: Callable[[str], bool], path: str = "") -> Any:
    """`_clone`, with the tensors whose path `keep` refuses left out (None)."""
    if isinstance(value, torch.Tensor):
        return value.clone() if keep(path) else None
    if isinstance(value, Mapping):
        return {k: _clone_kept(v, keep, f"{path}.{k}" if path else str(k))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out = [_clone_kept(v, keep, f"{path}.{i}" if path else str(i))
               for i, v in enumerate(value)]
        return out if isinstance(value, list) else tuple(out)
    return _clone(value)


def tensor_bytes(value: Any) -> int:
    if isinstance(value, _SCALARS):
        return 0
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def _tensors(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a snapshot tree with its dotted path ("model.layer.weight")."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _tensors(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{path}.{i}" if path else str(i))

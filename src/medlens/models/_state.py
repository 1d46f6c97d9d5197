"""Fingerprints and change keys of torch modules (the torch half of ``models.base``)."""

from __future__ import annotations

import hashlib
import weakref

import torch


def state_fingerprint(*modules: torch.nn.Module, extra: str = "") -> str:
    """Hash of all parameters and buffers (+ a preprocessing description)."""
    h = hashlib.sha256(extra.encode())
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            t = v.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:
                t = t.float()
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# Bumped whenever a module some ``StateKey`` watches registers a parameter, buffer or
# submodule (torch's global registration hooks); modules built elsewhere (a sliced
# ``nn.Sequential`` in a forward pass) do not count.
_STRUCTURE = [0]
_WATCHED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def _structure_changed(module: torch.nn.Module, *_: object) -> None:
    if module in _WATCHED:
        _STRUCTURE[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_structure_changed)
torch.nn.modules.module.register_module_parameter_registration_hook(_structure_changed)
torch.nn.modules.module.register_module_buffer_registration_hook(_structure_changed)


class StateKey:
    """A cheap key that changes whenever ``module``'s state could have: each tensor's
    storage and version counter (bumped by every in-place write, optimizer steps and
    ``load_state_dict`` included). Lists the tensors again only after a structural change
    (new parameter, buffer or submodule) in a watched module, so a warm key costs ~0.1 ms where
    ``state_dict()`` costs ~1 ms: encoders ask for their fingerprint several times per
    analysis."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = module
        self._generation = -1
        self._tensors: list[torch.Tensor] = []

    def __call__(self) -> tuple[int, tuple[tuple[int, int], ...]]:
        if self._generation != _STRUCTURE[0]:
            _WATCHED.update(self._module.modules())
            self._tensors = list(self._module.state_dict(keep_vars=True).values())
            self._generation = _STRUCTURE[0]
        return self._generation, tuple((t.data_ptr(), t._version) for t in self._tensors)

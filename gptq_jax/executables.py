"""A process-wide LRU of compiled programs for functions of (graphdef, *arrays): a later model of the same structure
(another checkpoint, another prompt of the same shape) runs on the executable compiled for the first one.

Used by `gptq_jax.generate` (prefill, decode step, decode loop) and `gptq_jax.evaluate` (window NLL).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import jax

MAX_EXECUTABLES = 32
_EXECUTABLES: collections.OrderedDict[Any, Any] = collections.OrderedDict()


def signature(tree) -> tuple:
    """Hashable (tree structure, per leaf: shape, dtype, sharding) of a pytree of arrays."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None)) for x in leaves))


def compiled(fn: Callable, graphdef, statics: dict, args: tuple, donate: tuple[int, ...] = ()) -> tuple[Any, float]:
    """(executable, compile seconds: 0.0 when cached) of `fn(graphdef, *args, **statics)`. `fn` is a module-level
    function (its qualified name is part of the key), statics hashable; donate: argument indices whose buffers the
    executable may reuse (ignored on CPU)."""
    key = (fn.__module__, fn.__qualname__, graphdef, tuple(sorted(statics.items())), signature(args))
    exe = _EXECUTABLES.get(key)
    if exe is not None:
        _EXECUTABLES.move_to_end(key)
        return exe, 0.0
    t0 = time.perf_counter()
    donate = donate if jax.default_backend() != "cpu" else ()
    jitted = jax.jit(lambda *a: fn(graphdef, *a, **statics), donate_argnums=donate)
    exe = jitted.lower(*args).compile()
    _EXECUTABLES[key] = exe
    while len(_EXECUTABLES) > MAX_EXECUTABLES:
        _EXECUTABLES.popitem(last=False)
    return exe, time.perf_counter() - t0


def clear() -> None:
    """Drop every cached executable (e.g. after switching the kernel backend, which the programs captured)."""
    _EXECUTABLES.clear()

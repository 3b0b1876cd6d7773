"""Let Flax NNX import under JAX 0.11.

Every Flax release on PyPI up to 0.12.8 fails to import under JAX 0.11.x: `flax.nnx.variablelib` defines, at import
time, classes that subclass names JAX 0.11 removed from `jax.experimental.hijax` (`HiPrimitive`, `MutableHiType`,
and annotations naming `AvalQDD`/`AvalMutableQDD`). Those classes serve only Flax's experimental "hijax" variable
mode, which this project never turns on. So, when (and only when) those names are missing, this module gives them
inert placeholder classes before Flax is imported; nothing else in JAX or Flax is touched. Delete this module once
a Flax release supports the JAX versions we support (0.10 through 0.11+).

`gptq_jax/__init__.py` imports it, so it runs before any of our modules imports Flax.
"""

from __future__ import annotations

import logging

import jax

_NAMES = ("HiPrimitive", "MutableHiType", "AvalQDD", "AvalMutableQDD")

log = logging.getLogger(__name__)


class _Placeholder:
    """Stands in for a removed hijax class: constructible with any arguments, never used for computation."""

    def __init__(self, *args, **kwargs):
        pass

    def __class_getitem__(cls, item):
        return cls


def _install() -> list[str]:
    try:
        from jax.experimental import hijax
    except ImportError:  # an older JAX without hijax: Flax versions for it don't use it either
        return []
    patched = []
    for name in _NAMES:
        if not hasattr(hijax, name):
            setattr(hijax, name, type(name, (_Placeholder,), {}))
            patched.append(name)
    return patched


PATCHED = _install()
if PATCHED:
    log.debug("JAX %s: placeholders for jax.experimental.hijax.%s so Flax imports", jax.__version__, PATCHED)

"""Backend registry and dispatch.

A backend is a module with ``NAME``, ``DTYPES`` (input dtypes it runs at speed), ``available()`` (True or a reason)
and three primitives with one signature each: ``fold(acc, base, group)``, ``stats(base, group, acc_dtype)`` and
``finalize(acc, base, out_group)``. A backend the user names (argument, else ``JITKERNELS_BACKEND``) is always the one
that runs, or the call fails with :class:`BackendUnavailable`; only ``"auto"`` lets :func:`choose` decide, per input
dtype, in the order cpp > numba > numpy (the Aggregator resolves "auto" to "cupy" when its template is in GPU memory).
Nothing is swapped silently.
"""

from __future__ import annotations

import importlib
import os

from ..errors import BackendUnavailable

_MODULES = {"numpy": "numpy_ref", "numba": "numba_kernels", "cpp": "cpp", "cupy": "cupy_backend"}
AUTO_ORDER = ("cpp", "numba", "numpy")
_loaded: dict = {}


def _module(name: str):
    if name not in _loaded:
        _loaded[name] = importlib.import_module(f".{_MODULES[name]}", __name__)
    return _loaded[name]


def available_backends() -> dict:
    """``{name: True or the reason it cannot run here}`` for every backend."""
    return {name: _module_available(name) for name in _MODULES}


def is_available(name: str) -> bool:
    """Whether backend ``name`` runs here (cached: what is installed does not change while the process runs)."""
    ok = _available_cache.get(name)
    if ok is None:
        ok = _available_cache[name] = _module_available(name) is True
    return ok


_available_cache: dict = {}


def requested(name: str | None) -> str:
    """The backend a user asked for: the argument, else ``JITKERNELS_BACKEND``, else 'auto'."""
    name = name or os.environ.get("JITKERNELS_BACKEND") or "auto"
    if name != "auto" and name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose from auto, {', '.join(_MODULES)}")
    return name


def get(name: str):
    """The module of an explicitly named backend, or :class:`BackendUnavailable` with the reason."""
    if name not in _MODULES:  # ("unavailable: KeyError: 'foo'" named no backend there is)
        raise BackendUnavailable(f"no backend {name!r}; the backends are {', '.join(_MODULES)}")
    ok = _module_available(name)
    if ok is not True:
        raise BackendUnavailable(f"backend {name!r} unavailable: {ok}")
    return _module(name)


def _module_available(name):
    try:
        return _module(name).available()
    except Exception as e:  # an import failure is a reason, not a crash
        return f"{type(e).__name__}: {e}"


_chosen: dict = {}


def _forget_in_child() -> None:
    """A forked child decides again: a backend may not run there (numba after its threading layer started in the
    parent: jitkernels._numba.available)."""
    _available_cache.clear()
    _chosen.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def choose(name: str, in_dtype: str):
    """Backend module that runs ``in_dtype`` for a request ``name`` ('auto' or a backend). Resolved once per pair:
    what is installed does not change while the process runs."""
    mod = _chosen.get((name, in_dtype))
    if mod is None:
        mod = _chosen[(name, in_dtype)] = _resolve(name, in_dtype)
    return mod


def _resolve(name: str, in_dtype: str):
    if name != "auto":
        mod = get(name)
        if in_dtype not in mod.DTYPES:
            raise BackendUnavailable(
                f"backend {name!r} does not run {in_dtype} inputs (it runs {', '.join(mod.DTYPES)}); "
                f"use backend='auto' or one that does")
        return mod
    for cand in AUTO_ORDER:
        if _module_available(cand) is True and in_dtype in _module(cand).DTYPES:
            return _module(cand)
    raise BackendUnavailable(f"no backend runs {in_dtype}")  # pragma: no cover - numpy runs every dtype

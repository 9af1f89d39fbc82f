"""Layouts: the names, shapes, dtypes and flat offsets of a job's leaves.

A layout is fixed by a template (or the first update): a ``dict`` (a state_dict; nested dicts allowed), a ``list`` or
``tuple`` (Flower's NDArrays), or one array, whose leaves are numpy arrays or torch CPU tensors. Every later update
must match it exactly, or :class:`~jitkernels.errors.LayoutMismatch` names the first offending leaf.

Flattening never copies a contiguous native-endian leaf: the kernels read it in place. Non-contiguous or
byte-swapped leaves are copied once, at admission, into a contiguous native array (the kernels read flat memory).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .device import DeviceLeaf, aligned, device_leaf, gpu_of, is_device_array, leaf_to, leaf_to_cupy, realigned
from .dtypes import (Quantized, dtype_name, is_float_name, is_leaf_dtype_name, is_torch_tensor, native, np_dtype,
                     numpy_to_torch, torch_to_numpy)
from .errors import BackendUnavailable, InvalidTemplate, LayoutMismatch


MAX_DEPTH = 256
"""Containers a template may nest (a model's state_dict nests a few): the layout's walks recurse (two frames a level:
nests of 450 worked, 600 raised RecursionError), and a file's tree is checked against it before they do."""


@dataclass(frozen=True)
class Leaf:
    name: str
    shape: tuple
    dtype: str
    offset: int
    size: int

    @property
    def is_float(self) -> bool:
        return is_float_name(self.dtype)


def _as_array(x, name, party, writable=False):
    """A native, C-contiguous, aligned numpy view of one leaf (a copy only when the leaf is strided, byte-swapped or
    off its elements' alignment; with ``writable`` such a leaf is refused instead, since writes into a copy would be
    lost). Alignment: the compiled kernels read through typed pointers, so a view at an odd byte offset of a
    received buffer was undefined behaviour there (right on x86 today, UBSan's finding; a fault on a GPU)."""
    if isinstance(x, Quantized):
        if writable:  # (an update's wire form, not a buffer to write a result into)
            raise LayoutMismatch("an output leaf must be an array, not a Quantized leaf", leaf=name, party=party)
        if x.on_device:
            _on_current_gpu(x.values, name, party)
            _on_current_gpu(x.scale, name, party)
        if not aligned(x.scale):  # (built without __post_init__: unpickled from out-of-band buffers, say)
            x = Quantized(x.values, realigned(x.scale), x.block)
        return x
    if is_device_array(x):
        from .backends import cupy_backend  # (imported here: it imports this module)

        why = cupy_backend.available()
        if why is not True:  # a torch CUDA tensor where CuPy is missing: the reason, naming the leaf and party
            raise BackendUnavailable(f"party {party!r}, leaf {name!r}: the array is in GPU memory, and the GPU backend "
                                     f"cannot run here: {why}")
        _on_current_gpu(x, name, party)
        if writable and not _contiguous(x):
            raise LayoutMismatch("an output leaf must be C-contiguous", leaf=name, party=party)
        try:  # (as the host path below: what DLPack cannot export, or exports as other values)
            leaf = device_leaf(x, copy=not writable)
        except (TypeError, RuntimeError, ValueError, BufferError) as e:
            raise LayoutMismatch(f"a GPU array that cannot be read in place: {e}", leaf=name, party=party) from None
        if writable and not aligned(leaf.array):  # (a copy would take the result, and the caller's buffer nothing)
            raise LayoutMismatch("an output leaf must be C-contiguous and aligned", leaf=name, party=party)
        return leaf
    if is_torch_tensor(x):
        try:  # (sparse, meta, nested, quantized and float8 tensors, and views with the neg or conj bit set)
            x = torch_to_numpy(x)
        except (TypeError, RuntimeError) as e:
            raise LayoutMismatch(f"a torch tensor that numpy cannot read in place: {e}", leaf=name,
                                 party=party) from None
    elif type(x) is not np.ndarray:
        if writable and isinstance(x, np.generic):  # np.asarray makes a new array: the result would be lost
            raise LayoutMismatch(f"an output leaf must be an array to write into, got the numpy scalar "
                                 f"{type(x).__name__} (use np.zeros(()) for a 0-d leaf)", leaf=name, party=party)
        if isinstance(x, np.ma.MaskedArray):  # np.asarray drops the mask: the masked values would be summed
            raise LayoutMismatch("a masked array: fill or compress it first (its masked values would be summed)",
                                 leaf=name, party=party)
        if not isinstance(x, (np.ndarray, np.generic)):
            raise LayoutMismatch(f"expected an array, got {type(x).__name__}", leaf=name, party=party)
    a = np.asarray(x)
    if writable and not (a.dtype.isnative and a.flags.c_contiguous and a.flags.writeable and a.flags.aligned):
        raise LayoutMismatch("an output leaf must be writeable, C-contiguous, aligned and native-endian", leaf=name,
                             party=party)
    a = native(a)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    if not a.flags.aligned:  # (np.ascontiguousarray keeps a misaligned view that is contiguous)
        a = realigned(a)
    return a


def _on_current_gpu(x, name, party) -> None:
    """The kernels run on the runtime's current device: another GPU's memory is an illegal address there."""
    from .backends import cupy_backend  # (imported here: it imports this module)

    gpu, current = gpu_of(x), cupy_backend.runtime().device_id()
    if gpu != current:
        raise LayoutMismatch(f"the array is on GPU {gpu}; the GPU backend runs on the current device, GPU {current} "
                             f"(copy it there, or work under cupy.cuda.Device({gpu}))", leaf=name, party=party)


def _contiguous(x) -> bool:
    c = getattr(x, "is_contiguous", None)
    return c() if callable(c) else bool(x.flags.c_contiguous)


ARRAY_TYPES = ("numpy", "torch", "torch_cuda", "cupy")
_HOST_OF = {"cupy": "numpy", "torch_cuda": "torch"}  # the array types of GPU memory, and their host counterparts


def array_type_of(x) -> str:
    """'numpy', 'torch' (CPU), 'torch_cuda' or 'cupy': what a finalized result is returned as."""
    if is_torch_tensor(x):
        return "torch_cuda" if x.device.type == "cuda" else "torch"
    return "cupy" if is_device_array(x) else "numpy"


def _join(prefix: str, key) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


class Layout:
    """Leaves of a job in flattening order, with their offsets into one flat accumulator."""

    def __init__(self, leaves, treedef, array_type: str = "numpy", makers=None):
        self.leaves = tuple(leaves)
        self.treedef = treedef
        self.array_type = array_type
        self.size = sum(leaf.size for leaf in self.leaves)
        # the template's container types beyond dict/list/tuple, in the tree's pre-order (None: all plain): results
        # come back as an OrderedDict (torch's state_dict) or a namedtuple as the template was. Not in files: a state
        # loaded from one rebuilds plain dicts and tuples
        self.makers = makers

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_template(cls, template) -> "Layout":
        leaves, arrays, makers = [], [], []
        offset = 0
        array_type = "numpy"

        def walk(node, prefix, depth=0):
            nonlocal offset, array_type
            if isinstance(node, (dict, list, tuple)):
                if depth >= MAX_DEPTH:
                    raise InvalidTemplate(f"the template nests deeper than {MAX_DEPTH} containers (under {prefix!r})")
                makers.append(_maker(node))
            if isinstance(node, dict):
                keys = list(node.keys())
                for k in keys:
                    if not isinstance(k, str):
                        raise InvalidTemplate(f"dict keys must be str, got {k!r} under {prefix or 'the root'!r}")
                return {"t": "dict", "k": keys, "c": [walk(node[k], _join(prefix, k), depth + 1) for k in keys]}
            if isinstance(node, (list, tuple)):
                kind = "list" if isinstance(node, list) else "tuple"
                return {"t": kind, "c": [walk(v, _join(prefix, i), depth + 1) for i, v in enumerate(node)]}
            if array_type == "numpy":
                array_type = array_type_of(node)
            if isinstance(node, Quantized):
                raise InvalidTemplate(f"template leaf {prefix!r} is Quantized: a template gives the output dtype")
            name = prefix or "<root>"
            try:
                a = _as_array(node, name, None)
            except LayoutMismatch as e:  # (a template that describes no model is not a party's bad update)
                raise InvalidTemplate(f"template {e}") from None
            if not is_leaf_dtype_name(dtype_name(a.dtype)):
                raise InvalidTemplate(f"template leaf {name!r} has dtype {a.dtype}: leaves are float, integer or bool")
            leaves.append(Leaf(name, tuple(a.shape), dtype_name(a.dtype), offset, int(a.size)))
            arrays.append(a)
            offset += int(a.size)
            return {"t": "leaf"}

        treedef = walk(template, "")
        if not leaves:
            raise InvalidTemplate("template has no array leaves")
        _check_names([leaf.name for leaf in leaves], InvalidTemplate)
        return cls(leaves, treedef, array_type, tuple(makers) if any(makers) else None)

    # --- identity -----------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "leaves": [[l.name, list(l.shape), l.dtype] for l in self.leaves],
            "treedef": self.treedef,
            "array_type": self.array_type,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Layout":
        """The layout :meth:`to_json` wrote, checked (it comes from a file): ValueError if it is not one that
        :meth:`from_template` could have made (leaf names, shapes, dtypes, a tree with one node per leaf)."""
        leaves, offset = [], 0
        for entry in d["leaves"]:
            name, shape, dt = entry
            if not (isinstance(name, str) and isinstance(shape, list) and is_leaf_dtype_name(dt)
                    and all(type(n) is int and n >= 0 for n in shape)):
                raise ValueError(f"layout leaf {entry!r} is not (name, shape, supported dtype)")
            size = math.prod(shape)  # (in Python ints: int64's product wraps, (2^32, 2^32, 1) made 0)
            if size >= 1 << 62:
                raise ValueError(f"layout leaf {name!r} has {size} values")
            leaves.append(Leaf(name, tuple(shape), dt, offset, size))
            offset += size
        names = _tree_names(d["treedef"])
        if names != [leaf.name for leaf in leaves] or not leaves:
            raise ValueError(f"the layout's tree has {len(names)} leaves {names[:4]}, its leaf list {len(leaves)} "
                             f"{[leaf.name for leaf in leaves][:4]}")
        _check_names(names, ValueError)
        if d.get("array_type", "numpy") not in ARRAY_TYPES:
            raise ValueError(f"unknown array type {d['array_type']!r}")
        return cls(leaves, d["treedef"], d.get("array_type", "numpy"))

    @property
    def default_acc_dtype(self) -> str:
        """The accumulator dtype where none is named: float64 for a template with a float64 leaf (averaged in float32
        it came back rounded to float32 inside float64 arrays), else float32."""
        return "float64" if any(leaf.dtype == "float64" for leaf in self.leaves) else "float32"

    @cached_property
    def int_leaves(self) -> tuple:
        """Indices of the integer (and bool) leaves: counters, which the float kernels do not fold."""
        return tuple(i for i, leaf in enumerate(self.leaves) if not is_float_name(leaf.dtype))

    @cached_property
    def fingerprint(self) -> str:
        """Hash of names, shapes, dtypes and nesting (not of the array type): equal layouts can merge."""
        d = self.to_json()
        d.pop("array_type")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def in_gpu_memory(self) -> bool:
        """The template's leaves were in GPU memory (CuPy arrays or torch CUDA tensors): results go there too."""
        return self.array_type in _HOST_OF

    def on_host(self) -> "Layout":
        """This layout with the host counterpart of its array type (CuPy -> numpy, torch CUDA -> torch CPU): where
        results go when its leaves are folded on a CPU backend of a machine without a GPU."""
        return Layout(self.leaves, self.treedef, _HOST_OF[self.array_type], self.makers) if self.in_gpu_memory \
            else self

    def __eq__(self, other):
        return isinstance(other, Layout) and self.fingerprint == other.fingerprint

    def __hash__(self):
        return hash(self.fingerprint)

    def __len__(self):
        return len(self.leaves)

    def __repr__(self):
        return f"Layout({len(self.leaves)} leaves, {self.size} elements, {self.array_type})"

    @cached_property
    def offsets(self) -> np.ndarray:
        return np.fromiter((l.offset for l in self.leaves), np.int64, len(self.leaves))

    @cached_property
    def sizes(self) -> np.ndarray:
        return np.fromiter((l.size for l in self.leaves), np.int64, len(self.leaves))

    @cached_property
    def nbytes(self) -> int:
        return sum(l.size * np.dtype(l.dtype if l.dtype != "bfloat16" else "uint16").itemsize for l in self.leaves)

    # --- flatten / unflatten ------------------------------------------------------------------------------------
    def flatten(self, update, *, party=None, partial: bool = False, writable: bool = False) -> list:
        """Leaves of ``update`` in layout order: native contiguous arrays, :class:`Quantized`, or ``None`` where a
        partial update (``partial=True``) leaves a dict entry out. Raises :class:`LayoutMismatch` naming the leaf.
        ``writable``: the leaves are outputs, to be written in place (no copies allowed)."""
        if not writable and type(update) is dict and self._flat_keys is not None and len(update) == len(
                self._flat_keys):
            fast = _flat_dict(self, update)  # the common case, a flat dict of numpy arrays: checked in one loop
            if fast is not None:
                return fast
        out: list = [None] * len(self.leaves)
        # module-level recursion, not a nested closure: a recursive closure is a reference cycle that would keep
        # every flattened update alive until the cyclic GC runs
        _flatten(self, update, self.treedef, "", out, 0, party, partial, writable)
        return out

    @cached_property
    def _flat_keys(self):
        """The keys of a template that is one flat dict of leaves (else None), with each leaf's (shape, numpy
        dtype): what :func:`_flat_dict` checks."""
        td = self.treedef
        if td["t"] != "dict" or any(c["t"] != "leaf" for c in td["c"]):
            return None
        # bfloat16 as ml_dtypes' numpy dtype: a None here compared equal to float64 (numpy's dtype == None is
        # float64), and a float64 array passed for a bf16 leaf, its bytes read as bf16
        return [(k, leaf.shape, np_dtype(leaf.dtype)) for k, leaf in zip(td["k"], self.leaves)]

    def unflatten(self, arrays):
        """Rebuild the template's container from leaf arrays (numpy, or device leaves), as the template's array
        type; a :class:`Quantized` leaf (an update's wire form) stays as it is."""
        at = self.array_type

        def conv(a):
            if isinstance(a, Quantized):
                return a
            if isinstance(a, DeviceLeaf):
                return leaf_to(a, at)
            if at in ("torch", "torch_cuda"):
                t = numpy_to_torch(a)
                return t.cuda() if at == "torch_cuda" else t
            return a if at == "numpy" else leaf_to_cupy(a)

        return _build(self.treedef, iter(arrays), conv, iter(self.makers) if self.makers else None)


def _flatten(layout, node, td, prefix, out, pos, party, partial, writable=False) -> int:
    """Fill ``out`` from ``node`` following ``td``, starting at leaf ``pos``; returns the next leaf position."""
    kind = td["t"]
    where = prefix or "<root>"
    if kind == "dict":
        if not isinstance(node, dict):
            raise LayoutMismatch(f"expected a dict, got {type(node).__name__}", leaf=where, party=party)
        keys = set(td["k"])
        extra = [k for k in node if k not in keys]
        if extra:
            raise LayoutMismatch("not in the layout", leaf=_join(prefix, extra[0]), party=party)
        for k, child in zip(td["k"], td["c"]):
            if k in node:
                pos = _flatten(layout, node[k], child, _join(prefix, k), out, pos, party, partial, writable)
            elif partial:
                pos += _count_leaves(child)
            else:
                raise LayoutMismatch("missing from the update", leaf=_join(prefix, k), party=party)
        return pos
    if kind in ("list", "tuple"):
        if not isinstance(node, (list, tuple)):
            raise LayoutMismatch(f"expected a {kind}, got {type(node).__name__}", leaf=where, party=party)
        if len(node) != len(td["c"]):
            raise LayoutMismatch(f"{len(node)} entries, layout has {len(td['c'])}", leaf=where, party=party)
        for i, (v, child) in enumerate(zip(node, td["c"])):
            pos = _flatten(layout, v, child, _join(prefix, i), out, pos, party, partial, writable)
        return pos
    leaf = layout.leaves[pos]
    a = _as_array(node, leaf.name, party, writable)
    if tuple(a.shape) != leaf.shape:
        raise LayoutMismatch(f"shape {tuple(a.shape)}, layout has {leaf.shape}", leaf=leaf.name, party=party)
    if isinstance(a, Quantized):
        if not leaf.is_float:
            raise LayoutMismatch(f"quantized value for a {leaf.dtype} leaf", leaf=leaf.name, party=party)
    elif dtype_name(a.dtype) != leaf.dtype:
        raise LayoutMismatch(f"dtype {dtype_name(a.dtype)}, layout has {leaf.dtype}", leaf=leaf.name, party=party)
    out[pos] = a
    return pos + 1


def _flat_dict(layout, update):
    """Leaves of a flat dict whose values are all native, C-contiguous, aligned numpy arrays of the layout's shapes
    and dtypes, or None (then the general walk runs: it names what is wrong, and copies what is only strided,
    byte-swapped or misaligned)."""
    out = []
    for key, shape, dt in layout._flat_keys:
        a = update.get(key)
        if type(a) is not np.ndarray or a.dtype != dt or a.shape != shape:
            return None
        f = a.flags  # (a new flags object each time it is read)
        if not (f.c_contiguous and f.aligned and a.dtype.isnative):
            return None
        out.append(a)
    return out


def _maker(node):
    """How to rebuild a template container of a type other than dict, list and tuple, from its items (pairs for a
    dict): an OrderedDict's or a namedtuple's; None for the plain types, and for other subclasses, which come back as
    their plain type (a defaultdict, say: its constructor takes a default factory first)."""
    t = type(node)
    if t in (dict, list, tuple):
        return None
    if isinstance(node, tuple) and hasattr(t, "_make") and hasattr(t, "_fields"):  # a namedtuple
        return t._make
    if issubclass(t, OrderedDict):
        return t
    return None


def _build(td, it, conv, makers=None):
    kind = td["t"]
    if kind == "leaf":
        return conv(next(it))
    make = next(makers) if makers is not None else None  # (pre-order: this node's before its children's)
    if kind == "dict":
        pairs = [(k, _build(c, it, conv, makers)) for k, c in zip(td["k"], td["c"])]
        return dict(pairs) if make is None else make(pairs)
    items = [_build(c, it, conv, makers) for c in td["c"]]
    if make is not None:
        return make(items)
    return items if kind == "list" else tuple(items)


def _tree_names(td) -> list:
    """The leaf names of a tree read from a file, in flattening order (as from_template names them), checked node by
    node without recursion (a crafted file may nest deeply): ValueError unless every node is a dict (distinct str
    keys, one child each), a list, a tuple or a leaf."""
    names, todo = [], [(td, "", 0)]
    while todo:
        node, prefix, depth = todo.pop()
        kind = node.get("t") if isinstance(node, dict) else None
        if kind == "leaf":
            names.append(prefix or "<root>")
            continue
        if depth >= MAX_DEPTH:  # (the layout's other walks recurse: a crafted file loaded, then failed at finalize)
            raise ValueError(f"the layout's tree nests deeper than {MAX_DEPTH} containers")
        children = node.get("c") if kind in ("dict", "list", "tuple") else None
        keys = node.get("k") if kind == "dict" else range(len(children)) if isinstance(children, list) else None
        if not isinstance(children, list) or (kind == "dict" and not (
                isinstance(keys, list) and len(keys) == len(children) and all(isinstance(k, str) for k in keys)
                and len(set(keys)) == len(keys))):
            raise ValueError(f"the layout's tree has a malformed node {str(node)[:80]}")
        todo.extend((c, _join(prefix, k), depth + 1) for k, c in reversed(list(zip(keys, children))))
    return names


def _check_names(names, error) -> None:
    """Leaf names are the keys of results, robust stores and files: two leaves of one name (``{"a.b": x, "a": {"b":
    y}}``) would be told apart nowhere."""
    if len(set(names)) < len(names):
        seen = set()
        twice = next(n for n in names if n in seen or seen.add(n))
        raise error(f"two leaves are named {twice!r} (a key with a dot beside a nested one?): rename one")


def _count_leaves(td) -> int:
    if td["t"] == "leaf":
        return 1
    return sum(_count_leaves(c) for c in td["c"])

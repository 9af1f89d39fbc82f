"""Flower (flwr) integration: drop-in strategies that aggregate with jitkernels, and zero-copy views of the
parameters Flower ships.

Flower serializes each array with ``np.save(..., allow_pickle=False)`` (``flwr.common.ndarray_to_bytes``), and its
``parameters_to_ndarrays`` copies every byte back out through ``np.load``: at 25M parameters x 10 parties that copy
costs more than a fused fold of the same updates. :func:`ndarrays_from_parameters` reads the ``.npy`` header (a
Python literal, parsed by numpy's ``read_array_header`` with ``ast.literal_eval``; never unpickled) and returns
read-only ``np.frombuffer`` views into the received bytes, which the fold kernels read in place. The new model is
finalized straight into the ``bytes`` objects of the returned ``Parameters`` (:func:`parameters_buffers`): no copy on
the way out either.

Strategies (:class:`FedAvg`, :class:`FedAvgM`, :class:`FedAdam`, :class:`FedYogi`, :class:`FedAdagrad`, and the robust
:class:`FedMedian`, :class:`FedTrimmedAvg`, :class:`Krum` over jitkernels' buffered slab kernels) subclass
Flower's own, take the same arguments (plus ``backend=``), and replace ``aggregate_fit``; everything else (client
sampling, configuration, evaluation) is Flower's. Their results equal Flower's within the rounding of the
accumulator (float32 for float32 and float16 models, float64 where a float64 array is in the model; the robust
strategies store the round's results in a float32 slab whatever the model's dtype, so on a float64 model they select
and average float32-rounded values: a value past float32's range is refused by name, and Krum may select another
result than Flower's where their float64 distances differ below float32's resolution), with these
deliberate differences: integer arrays are averaged (Flower's ``aggregate_inplace`` zeroes them); float16 models are
accumulated in float32 (Flower's ``aggregate`` overflows); results keep the model's dtype (Flower's FedAdam returns
float64, a NEP 50 promotion): float results in another dtype (float32 clients of a float64 model, or a round whose
clients switched dtype) are converted to the model's, a copy of those arrays, where Flower's numpy promotes; deltas
are folded as ``u - x`` (Flower forms the average, then subtracts, which turns rounding into steps); clients that
report ``num_examples == 0`` are left out of weighted averages (they weigh nothing in Flower either) and kept by the
rules that ignore weights (median, trimmed mean), as Flower keeps them; a negative or non-finite ``num_examples`` is
refused naming the client (:class:`~jitkernels.errors.InvalidWeight`; Flower's average takes it); a round whose
results all hold no arrays is refused (:class:`~jitkernels.errors.InvalidTemplate`: there is no model to fold;
Flower returns empty parameters); float128 arrays are refused by name (Flower's numpy averages them). The first round's
results fix the model's layout from the shapes and dtypes most of them share, so that a malformed result is the one
named. Errors name a result by its proxy's ``cid`` (the Message API's: ``node-<src_node_id>``), or by its place
(``result-<i>``, ``reply-<i>``) where those ids are not distinct strings or integers (Flower takes any). The Message
API's strategies match arrays by their names (keys), name the arrays in errors by their keys, and refuse a
``current_arrays`` whose keys differ from the replies' (:class:`~jitkernels.errors.LayoutMismatch`, as Flower refuses).
A result refused for what it is itself (unreadable bytes, NaN or inf, a bad ``num_examples``, a shape the fixed
model lacks) is logged and left out of the round, with ``accept_failures=True`` (Flower's default; the Message API
strategies take the keyword too), and raised with ``False``: :meth:`_Runner.without_refused`.

Krum and Multi-Krum are ``variant="flower"`` of :class:`jitkernels.robust.Krum` (whose default keeps the paper's
k >= 2f + 3): as Flower's ``aggregate_krum`` and ``select_multikrum``, they run with any k (``max(1, k - f - 2)``
neighbours), score the results with ``num_examples == 0`` (which weigh 0 in Multi-Krum's average; Krum returns its
selected result whatever its weight) and keep all k when asked to keep more. Differences: exact score ties go to the
earlier result (Flower's strategy-API Krum with ``num_clients_to_keep=0`` does too, by ``np.argmin``; its Multi-Krum,
``num_clients_to_keep >= 1``, and its Message API take whichever ``np.argsort``, not stable, puts first: often the
later one. Ties are certain where k - f - 2 <= 1, since the closest pair then share the lowest score, so such small
federations may keep another client's model than Flower's); a Multi-Krum selection whose results all report 0 examples raises
:class:`~jitkernels.errors.EmptyAggregate` (Flower's strategy API returns NaN arrays, its Message API raises
ZeroDivisionError); with ``num_clients_to_keep`` above k the strategy API keeps all k (Flower's slice
``argsort(scores)[::-1][k - to_keep:]`` keeps the ``to_keep - k`` lowest).

The server optimizers step from the model Flower's own classes read each round (``current_weights``,
``initial_parameters``, ``current_arrays``), so a caller that replaces it between rounds gets Flower's result (a
float base in another dtype than the model's is converted, as results are); this costs one copy of the model into
the step's state per round, but where the model is the one the strategy returned last (views of its bytes), which
the state holds already (``_Runner.model``). Every strategy reads its hyperparameters (``eta``,
``server_learning_rate``, ``beta``, ``num_clients_to_keep``, ...) at each aggregate, as Flower's do: a schedule that
sets them between rounds takes effect at the next aggregate, the moments and round counter carried. A round that
raises (a float16 model stepped past its range) leaves their moments and round counter as they were
(``_Runner._step`` says what that costs), and FedAvgM restarts its momentum at ``server_round`` 1, as Flower's
strategy-API FedAvgM does.
"""

from __future__ import annotations

import collections
import functools
import io
import logging
import math
import numbers

import ml_dtypes
import numpy as np

import jitkernels as jk

from .. import algorithms as A
from .. import robust as R
from ..dtypes import np_dtype
from ..errors import InvalidParty, InvalidWeight, LayoutMismatch, NonFiniteUpdate, shown
from ..parties import check_party

log = logging.getLogger(__name__)

_MAGIC = b"\x93NUMPY"


def ndarray_view(buf: bytes, *, party=None, index: int | None = None) -> np.ndarray:
    """A read-only view of the array serialized in ``buf`` (``.npy`` format, versions 1-3), without copying.

    Raises :class:`~jitkernels.errors.LayoutMismatch` (naming the party and the array's index) for anything else:
    a truncated buffer, an object dtype (which would need unpickling), a bad header."""
    where = f"array {index}" if index is not None else None
    try:
        mv = memoryview(buf)
    except TypeError:
        raise LayoutMismatch(f"expected the bytes of a .npy array, got {type(buf).__name__}", leaf=where,
                             party=party) from None
    if not mv.c_contiguous:  # (a strided view raised a bare BufferError at frombuffer)
        raise LayoutMismatch("the .npy bytes are not contiguous", leaf=where, party=party)
    if mv.ndim != 1 or mv.itemsize != 1:  # (a 2-D uint8 array's view raised NotImplementedError at mv[6])
        mv = mv.cast("B")
    if bytes(mv[:6]) != _MAGIC or len(mv) < 10:
        raise LayoutMismatch("not a .npy serialized array", leaf=where, party=party)
    major = mv[6]
    if major not in (1, 2, 3):
        raise LayoutMismatch(f".npy format version {major} is not one of 1-3", leaf=where, party=party)
    hlen_size = 2 if major == 1 else 4
    if len(mv) < 8 + hlen_size:
        raise LayoutMismatch("truncated .npy header", leaf=where, party=party)
    start = 8 + hlen_size + int.from_bytes(mv[8:8 + hlen_size], "little")
    shape, fortran, dtype = _header(bytes(mv[:start]), where, party)
    if dtype.hasobject:
        raise LayoutMismatch("object arrays are refused (they would need unpickling)", leaf=where, party=party)
    if dtype.subdtype is not None:  # np.load would return another shape than the header's
        raise LayoutMismatch(f"subarray dtype {dtype} in the .npy header", leaf=where, party=party)
    if not isinstance(shape, tuple) or any(type(d) is not int or d < 0 for d in shape):  # (True is an int)
        raise LayoutMismatch(f"bad shape {shown(shape, 80)} in the .npy header", leaf=where, party=party)
    if dtype.itemsize == 0:  # |V0, |S0: any shape matched the 0 data bytes
        raise LayoutMismatch(f"dtype {dtype} in the .npy header holds no bytes", leaf=where, party=party)
    count = 1
    for d in shape:  # Python ints: a crafted (2^32, 2^32) wrapped to 0 in int64 and passed the size check
        count *= d
    if len(mv) - start != count * dtype.itemsize:
        raise LayoutMismatch(f"{len(mv) - start} data bytes for {dtype}{shown(tuple(shape), 80)} "
                             f"({count * dtype.itemsize})",
                             leaf=where, party=party)
    flat = np.frombuffer(buf, dtype=dtype, count=count, offset=start)
    flat.flags.writeable = False  # a bytearray would give a writable view into memory its owner may reuse
    try:  # (more than numpy's 64 dimensions; zero elements in dimensions whose other sizes overflow an index)
        return flat.reshape(shape, order="F" if fortran else "C")
    except ValueError as e:
        raise LayoutMismatch(f"shape {shown(shape, 80)} in the .npy header ({e})", leaf=where, party=party) from None


@functools.lru_cache(maxsize=4096)
def _parse_header(head: bytes) -> tuple:
    # the parties of a job send the same few headers: parsing one (ast.literal_eval) costs ~40 us, a lookup ~0.2 us
    f = io.BytesIO(head[8:])
    fmt = np.lib.format
    return fmt.read_array_header_1_0(f) if head[6] == 1 else fmt.read_array_header_2_0(f)


def _header(head: bytes, where, party) -> tuple:
    try:
        return _parse_header(head)
    except Exception as e:  # (numpy's parse of a crafted header: ValueError, SyntaxError, RecursionError,
        # MemoryError, and also tokenize's TokenError for an unclosed brace and TypeError for a bytes key)
        raise LayoutMismatch(f"bad .npy header ({type(e).__name__}: {str(e)[:200]})", leaf=where,
                             party=party) from None


def ndarrays_from_parameters(parameters, *, party=None) -> list:
    """Zero-copy views of a ``flwr.common.Parameters``' tensors (numpy.ndarray serialization)."""
    if not hasattr(parameters, "tensors"):  # (None raised a bare AttributeError)
        raise LayoutMismatch(f"expected flwr Parameters, got {type(parameters).__name__}", party=party)
    if getattr(parameters, "tensor_type", "numpy.ndarray") != "numpy.ndarray":
        raise LayoutMismatch(f"tensor_type {parameters.tensor_type!r}; expected 'numpy.ndarray'", party=party)
    if not isinstance(parameters.tensors, (list, tuple)):  # (None raised a bare TypeError)
        raise LayoutMismatch(f"expected a list of tensors, got {type(parameters.tensors).__name__}", party=party)
    return [ndarray_view(t, party=party, index=i) for i, t in enumerate(parameters.tensors)]


def _npy_header(shape, dtype) -> bytes:
    """The exact header ``np.save`` writes for a C-contiguous array of this shape and dtype."""
    f = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    try:
        np.lib.format.write_array_header_1_0(f, d)
    except ValueError:  # a header too long for version 1.0
        f = io.BytesIO()
        np.lib.format.write_array_header_2_0(f, d)
    return f.getvalue()


def parameters_buffers(shapes_dtypes) -> tuple:
    """(tensors, arrays): new ``bytes`` objects laid out as ``np.save`` would write arrays of these shapes and
    dtypes, and writable numpy views of their data regions. Fill the arrays, then hand out the bytes (never write
    after that: bytes are immutable to everyone else)."""
    from .. import _core

    tensors, arrays = [], []
    for shape, dtype in shapes_dtypes:
        dt = np.dtype(dtype)
        head = _npy_header(shape, dt)
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        b, addr = _core.new_bytes(len(head) + n, _numpy_hugepages())
        raw = np.asarray(_BytesData(b, addr, len(head) + n))  # the array's base keeps the bytes alive
        raw[:len(head)] = np.frombuffer(head, np.uint8)
        tensors.append(b)
        arrays.append(raw[len(head):].view(dt).reshape(shape))
    return tensors, arrays


def _numpy_hugepages() -> bool:
    """numpy's switch for huge pages under its own large arrays (``NUMPY_MADVISE_HUGEPAGE``; on by default on Linux),
    which new bytes follow: filled on 4 KB pages, a fresh 100 MB took 40 ms against numpy's 6 ms."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    return bool(getattr(multiarray, "_get_madvise_hugepage", lambda: False)())


class _BytesData:
    """The data of a ``bytes`` object as a writable uint8 array interface, holding the bytes: an array made from it
    keeps them alive (a ctypes view from their address did not, and read freed memory once they were dropped)."""

    def __init__(self, owner: bytes, addr: int, n: int):
        self.owner = owner
        self.__array_interface__ = {"data": (addr, False), "shape": (n,), "typestr": "|u1", "version": 3}


def _to_model_dtype(v: np.ndarray, dtype, name: str, party) -> np.ndarray:
    """``v`` converted to the model's float ``dtype``; a finite value beyond its range (a float32 client of a
    float16 model sending 7e4) is refused, naming the result and the array, rather than turned into inf here and
    blamed on the client as a non-finite update."""
    with np.errstate(over="ignore"):
        out = v.astype(dtype)
    if out.dtype.itemsize < v.dtype.itemsize:
        bad = np.isfinite(v) & ~np.isfinite(out)
        if bad.any():
            raise jk.ValueOutOfRange(f"party {party!r}, leaf {name!r}: {v.dtype} value {v[bad].flat[0]!r} is beyond "
                                     f"the range of the model's dtype {np.dtype(dtype)} (the first result's; "
                                     f"Flower's numpy would promote)", party=party, leaf=name, value=v[bad].flat[0])
    return out


def _label(names, i: int) -> str:
    """How errors name array ``i``: by its key (the Message API's), else by its place."""
    return f"array {i}" if names is None else names[i]


def _distinct_ids(ids) -> bool:
    """Whether ``ids`` (the results' client or node ids) can name them as parties: each a str or an int, none
    repeated. Where not, both APIs name every result by its place: Flower takes any (a proxy without a cid, a
    MagicMock's, one proxy twice), and a place given to only some results could be another's real id."""
    try:
        ids = [check_party(i) for i in ids]
    except InvalidParty:
        return False
    return len(set(ids)) == len(ids)


def _or_refusal(read, *args, party):
    """``read(*args, party=party)``, or the LayoutMismatch it raised: a result whose bytes are no array of ours is
    refused, and the others are still read (:meth:`_Runner.without_refused` decides)."""
    try:
        return read(*args, party=party)
    except LayoutMismatch as e:
        return e


class _Misfit:
    """A result whose arrays are not the model's (other names: the Message API's keys), refused for the layout: if
    no result fits, the model changed (see :meth:`_Runner.without_refused`)."""

    def __init__(self, error):
        self.error = error


def _left_out(e) -> None:
    log.warning("jitkernels: the result of %r is left out of the round: %s: %s", e.party, type(e).__name__, e)


def _most_common_layout(views, kept) -> int:
    """The result among ``kept`` whose arrays' shapes and dtypes most results share (the first such on a tie)."""
    sigs = [tuple((v.shape, v.dtype.str) for v in views[j]) for j in kept]
    count = collections.Counter(sigs)
    return kept[max(range(len(kept)), key=lambda i: (count[sigs[i]], -i))]


class _Runner:
    """One jitkernels Aggregator kept across a strategy's rounds: the first results fix the layout; each round folds
    the results' zero-copy views in one pass and finalizes into new bytes laid out as ``np.save`` writes them.
    ``make()``: the algorithm with the strategy's hyperparameters as they are now (read again each round)."""

    def __init__(self, make, backend):
        from ..backends import requested

        requested(backend)  # (a typo failed at the first round, after the clients had trained)
        self.make, self.backend = make, backend
        self.algorithm = make()
        self.agg = None
        self.narrowing = False  # a float leaf's dtype narrower than the accumulator's (see _step)
        self.names = None  # the Message API's array names, in the layout's order (fixed by the first round)
        self.last_parties = []  # the party ids of the last round's replies (aggregate_records)
        self.kept = []  # the results the last aggregate aggregated (without_refused)
        self.model = None  # the last model out (its bytes, their data's addresses) where it is the state's own

    def fold_and_finalize(self, views, weights, parties, base=None, server_round=None, names=None, restart=False):
        """(bytes per leaf, the arrays viewing them) of the round's aggregate, or None when no update weighs.
        ``base``: the model the round's updates start from (Flower's strategies keep it, and a caller may replace
        it between rounds); None continues from the model the last step produced. ``server_round``: Flower's round
        number, which its adaptive optimizers' bias correction counts (not the steps applied: a round that returned
        no model still counts there). ``names``: the arrays' names (the Message API's keys), which the layout's
        leaves take (errors name them); views and base come in their order. ``restart``: the step starts from zero
        moments (Flower's strategy-API FedAvgM restarts its momentum at round 1).

        The first round's results fix the layout: the most common shapes and dtypes among them (a malformed result
        is then the one named, whatever its place), and a failed first fold fixes nothing. A float64 model (or base)
        is accumulated in float64, as Flower's numpy computes in the model's dtype: float32 accumulation lost
        updates below its resolution."""
        self._follow_hyperparameters()
        # num_examples: 0 weighs nothing (Flower's too); a negative, non-finite or non-number one is refused, naming
        # the result (it was left out as if it weighed 0, or counted as 1 by the median rules)
        weights = [0.0 if isinstance(w, numbers.Real) and not isinstance(w, (bool, np.bool_)) and w == 0
                   else jk.check_weight(w, p) for w, p in zip(weights, parties)]
        infos = None
        if "mass" in getattr(self.algorithm, "info_keys", ()):  # Krum: Flower scores results of weight 0 too
            infos = [{"mass": w} for w in weights]
            weights = [1.0] * len(weights)
        elif not getattr(self.algorithm, "uses_weights", True):  # median & co.: Flower counts every result
            weights = [w or 1.0 for w in weights]
        kept = [j for j, w in enumerate(weights) if w != 0]
        if len(kept) < len(weights):
            log.info("jitkernels: %d result(s) with weight 0 left out", len(weights) - len(kept))
        if not kept:
            return None
        # sample counts past ~1e32 passed a float32 accumulator's headroom (Flower's numpy divides by the total
        # first): a common power of two brings the largest to [0.5, 1), which changes no bit of the mean
        top = math.frexp(max(weights[j] for j in kept))[1]
        weights = [math.ldexp(w, -top) for w in weights]
        for j in kept:  # complex, datetime, structured: there is no average of those here (complex lost its part);
            for i, v in enumerate(views[j]):  # float128 neither (a first round of them failed naming no result)
                if v.dtype.kind not in "fiub" or v.dtype.kind == "f" and v.dtype.itemsize > 8:
                    raise LayoutMismatch(f"dtype {v.dtype} cannot be averaged (float16, float32, float64, integer or "
                                         f"bool arrays only)", leaf=_label(names, i), party=parties[j])
        def tree(arrays):  # the layout's container: a list, or a dict by the arrays' names
            return arrays if names is None or arrays is None else dict(zip(names, arrays))

        fresh = self.agg is None
        if fresh:
            tmpl = [np.empty(v.shape, v.dtype) for v in views[_most_common_layout(views, kept)]] if base is None \
                else base
            wide = any(np.dtype(a.dtype) == np.float64 for a in tmpl)
            self.agg = jk.Aggregator(tree(tmpl), self.algorithm, backend=self.backend, base=tree(base),
                                     acc_dtype="float64" if wide else None)
            top = ml_dtypes.finfo(np.dtype(self.agg.acc_dtype)).max
            self.narrowing = any(ml_dtypes.finfo(np_dtype(leaf.dtype)).max < top
                                 for leaf in self.agg.layout.leaves if leaf.is_float)
        elif base is not None or self.agg.state.count or self.agg.state.closed or self.agg.state.torn:
            # (torn: a fold that failed part-way has recorded no party, and every later round was refused)
            if base is not None and self._own_model(base):  # the model the last step left in the state, bit for
                base = None  # bit: not copied and checked again (18 of 82 ms of a FedAdam round at 25M)
            # a base in another float dtype (a float64 checkpoint of a float32 model): Flower's numpy promotes, the
            # layout is exact; converted as the results are
            self.agg.reset(tree(None if base is None else self._conform([base], ["<base>"], names)[0]), reuse=True)
        self.model = None
        try:
            self.agg.fold_many([tree(u) for u in self._conform([views[j] for j in kept], [parties[j] for j in kept],
                                                               names)],
                               [weights[j] for j in kept], [parties[j] for j in kept],
                               None if infos is None else [infos[j] for j in kept])
        except BaseException:
            if fresh:  # the next round's results fix the layout
                self.agg = None
            raise
        tensors, arrays = parameters_buffers([(leaf.shape, np_dtype(leaf.dtype)) for leaf in self.agg.layout.leaves])
        self._step(tree(arrays), server_round, restart)
        if self.agg.state.opt is not None and not self.narrowing and all(l.is_float for l in self.agg.layout.leaves):
            # a server step leaves its new model in the state (the next round's base), and a float model in the
            # accumulator's dtype is that model's bits. The bytes are held here (not through the list handed out,
            # which a caller may refill in place: freed, their addresses came back for other bytes, found in review)
            self.model = (tuple(tensors), [(a.ctypes.data, a.shape, a.dtype) for a in arrays])
        return tensors, arrays

    def _own_model(self, base) -> bool:
        """``base`` is the last model out, which the state holds bit for bit: views of its ``bytes`` (immutable), as
        the strategies keep it (ndarrays_from_parameters), each the whole array of one of them."""
        if self.model is None or not isinstance(base, (list, tuple)) or len(base) != len(self.model[1]):
            return False
        for b, t, m in zip(base, *self.model):
            root = b
            while isinstance(root, np.ndarray) and root.base is not None:
                root = root.base
            if root is not t or root is b or (b.ctypes.data, b.shape, b.dtype) != m or not b.flags.c_contiguous:
                return False
        return True

    def _follow_hyperparameters(self):
        """Flower reads a strategy's hyperparameters (eta, server_learning_rate, beta, num_clients_to_keep, ...) at
        each aggregate, so that a schedule or a tuner may set them between rounds: the round runs with ``make()``'s
        algorithm where its parameters differ from the last one's. The aggregator keeps its state (moments, round
        counter, the robust rules' slab), which the algorithm reads at finalize; another class of algorithm (FedAvgM's
        ``server_opt`` turned on) starts a new aggregator, as it has no state of the other's to carry."""
        alg = self.make()
        if alg.params() == self.algorithm.params():
            return
        self.algorithm = alg
        if self.agg is None:
            return
        if type(alg) is not type(self.agg.algorithm):
            self.agg = None
            return
        self.agg.algorithm = alg
        self.agg.state.algorithm = {**self.agg.state.algorithm, **alg.params()}  # (what a saved state records)

    def _step(self, out, server_round, restart):
        """Finalize into ``out``; a server optimizer's round that raises leaves its moments and round counter as they
        were (Flower's model is untouched too: the strategies store the new one only when the round returns it).
        The step updates the moments in place before the output is checked (a float16 model stepped past 65504), so
        they are copied first where an output can be out of range: a float leaf narrower than the accumulator
        (float16, bfloat16, or float32 in a float64 model; 4 bytes a parameter per moment with a float32
        accumulator). A float32 model in float32 pays nothing: its output is the state's model, refused only where
        the step itself overflowed float32 (a model near 3e38), and then its moments stay stepped."""
        st = self.agg.state
        if st.opt is None:
            self.agg.finalize(out=out)
            return
        before = st.round, dict(st.opt), {k: a.copy() for k, a in st.opt.items()} if self.narrowing else {}
        if server_round is not None:
            st.round = int(server_round) - 1  # steps before this one, as Flower counts them
        if restart:  # a zeroed m in place of the old one, which a round that raises puts back as it was
            st.opt["m"] = np.zeros_like(st.opt["m"])
        try:
            self.agg.finalize(out=out)
        except BaseException:
            st.round, moments, copies = before
            st.opt.update(moments)
            for k, a in copies.items():
                st.opt[k][...] = a
            if st.torn_model:  # a step stopped part-way (jitkernels.TornState): the model is Flower's, given again
                if copies:  # next round; the moments are back as they were: whole again
                    st.torn, st.torn_model = None, False
                else:  # moments stepped in part, with no copy to put back: the next round starts afresh (every
                    log.warning("jitkernels: the server step stopped part-way; its moments restart next round")
                    self.agg = None  # later one refused TornState at its reset)
            raise

    def _conform(self, updates, parties, names=None):
        """The results (or the base, party ``<base>``) with each float array in the model's float dtype: Flower's
        numpy math takes any mix (a float64 global model and float32 clients, a model whose dtype changes between
        rounds) and promotes; the aggregator's layout is exact. One that differs is converted (a copy of those
        arrays; float32 -> float64 is exact, float64 -> float32 rounds once) and the round says so in the log; other
        kinds are left for the aggregator to refuse (LayoutMismatch names the party and the array)."""
        want = [np_dtype(leaf.dtype) if leaf.is_float else None for leaf in self.agg.layout.leaves]
        out, converted = [], []
        for u, p in zip(updates, parties):
            if len(u) == len(want) and any(d is not None and v.dtype != d and v.dtype.kind == "f"
                                           for v, d in zip(u, want)):
                u = [_to_model_dtype(v, d, _label(names, i), p) if d is not None and v.dtype != d
                     and v.dtype.kind == "f" else v for i, (v, d) in enumerate(zip(u, want))]
                converted.append(p)
            out.append(u)
        if converted:
            log.info("jitkernels: float arrays in another dtype than the model's (%s) converted, from %s",
                     ", ".join(sorted({str(d) for d in want if d is not None})),
                     ", ".join(map(repr, converted[:3])) + (f" and {len(converted) - 3} more" if converted[3:] else ""))
        return out

    def aggregate(self, results, base=None, server_round=None, restart=False, drop=True):
        """Flower's strategy API: FitRes in, Parameters out (``drop``: see :meth:`without_refused`; ``kept``: the
        results aggregated)."""
        from flwr.common import Parameters

        cids = [getattr(cp, "cid", None) for cp, _ in results]
        parties = cids if _distinct_ids(cids) else [f"result-{i}" for i in range(len(results))]
        views = [_or_refusal(ndarrays_from_parameters, fr.parameters, party=p)
                 for (_, fr), p in zip(results, parties)]
        out = self.without_refused(views, [fr.num_examples for _, fr in results], parties, base, server_round,
                                   restart=restart, drop=drop)
        return None if out is None else Parameters(tensors=out[0], tensor_type="numpy.ndarray")

    def without_refused(self, views, weights, parties, base=None, server_round=None, names=None, restart=False,
                        drop=True):
        """:meth:`fold_and_finalize` of the results but those refused for what they are themselves: bytes that are
        no array of ours (a view that is the ``LayoutMismatch`` its reading raised: a truncated ``.npy``, another
        serialization), NaN or inf (``NonFiniteUpdate``), a bad ``num_examples`` (``InvalidWeight``), and, once the
        layout is fixed (by a base, or by an earlier round), a shape, dtype or array the model lacks
        (``LayoutMismatch``). Each is logged and left out, as Flower's server leaves out a client that failed, and
        the others are aggregated (one bad client failed the round, and with it a Flower run, where Flower's median
        and Krum had sorted it out); ``kept`` lists the results aggregated, and None comes back where none is
        (Flower's "no results"), unless no result fits the model's layout (:meth:`_misfit`; other array names are
        a :class:`_Misfit` view): results that all disagree with the model are no client's fault (a model changed
        between rounds; results refused otherwise first, a bad ``num_examples``, or left out for weighing 0, hid
        that), and the first layout refusal is raised (bytes that could not be read are a client's fault alone).
        Refusals that depend on the others or on the model (the accumulator's headroom, a weight ratio, a value past
        the model's dtype, a layout still being fixed) are raised, naming the result, as is any refusal with
        ``drop=False`` (a strategy with ``accept_failures=False``)."""
        refused = [v.error if isinstance(v, _Misfit) else v for v in views if isinstance(v, (_Misfit, LayoutMismatch))]
        layout = [v.error for v in views if isinstance(v, _Misfit)]
        if refused and not drop or layout and self.agg is None and base is None:  # (a layout still being fixed)
            raise (layout or refused)[0]
        for e in refused:
            _left_out(e)
        readable = [j for j, v in enumerate(views) if not isinstance(v, (_Misfit, LayoutMismatch))]
        self.kept, out = list(readable), None
        while self.kept:
            fixed = self.agg is not None or base is not None
            try:
                out = self.fold_and_finalize([views[j] for j in self.kept], [weights[j] for j in self.kept],
                                             [parties[j] for j in self.kept], base, server_round, names=names,
                                             restart=restart)
                break
            except (NonFiniteUpdate, InvalidWeight, LayoutMismatch) as e:
                bad = [j for j in self.kept if parties[j] == e.party]
                if not drop or not bad or isinstance(e, LayoutMismatch) and not fixed:
                    raise
                _left_out(e)
                if isinstance(e, LayoutMismatch):
                    layout.append(e)
                self.kept.remove(bad[0])
        if out is None and (self.agg is not None or base is not None):
            misfits = [self._misfit(views[j], base, names, parties[j]) for j in readable]
            if not any(m is None for m in misfits) and (layout or misfits):
                raise (layout + misfits)[0]
        return out

    def _misfit(self, view, base, names, party):
        """The LayoutMismatch of a result's arrays against the model's layout (the aggregator's, else the base's),
        or None where they fit: the layout's checks, which look at no value, with a float array in another float
        dtype standing in as the model's (the fold converts it: :meth:`_conform`; the stand-in is allocated, never
        touched)."""
        def tree(arrays):
            return arrays if names is None else dict(zip(names, arrays))
        layout = self.agg.layout if self.agg is not None else jk.Layout.from_template(tree(base))
        stand_in = [np.empty(v.shape, np_dtype(leaf.dtype)) if leaf.is_float and v.dtype.kind == "f" else v
                    for v, leaf in zip(view, layout.leaves)] + list(view[len(layout.leaves):])
        try:
            layout.flatten(tree(stand_in), party=party)
        except LayoutMismatch as e:
            return e
        return None

    def kept_of(self, results) -> list:
        """The results the last :meth:`aggregate` aggregated (its metrics are theirs: Flower never sees a failed
        client's)."""
        return [results[j] for j in self.kept]

    @staticmethod
    def reply_ids(replies) -> list:
        """The party ids :meth:`aggregate_records` gives the replies, in order: their source nodes' ids
        (``node-<id>``), or ``reply-<i>`` where those are not distinct ids (:func:`_distinct_ids`)."""
        nodes = [getattr(getattr(m, "metadata", None), "src_node_id", None) for m in replies]
        if not _distinct_ids(nodes):
            return [f"reply-{i}" for i in range(len(replies))]
        return [f"node-{n}" for n in nodes]

    def aggregate_records(self, replies, weight_key, base=None, server_round=None, drop=True):
        """Flower's Message API: the replies (one ArrayRecord and one MetricRecord each in their content, as
        Flower's strategies check) in, an ArrayRecord of the aggregate out (its Arrays' data are the new bytes), or
        None where no reply is kept (``drop``: see :meth:`without_refused`).
        Arrays are matched by name (a reply may list its keys in another order than the first round's); the result
        lists them as Flower's do: in ``base``'s order where given, else in this round's first reply's."""
        from flwr.app import Array, ArrayRecord

        contents = [m.content for m in replies]
        records = [next(iter(c.array_records.values())) for c in contents]
        weights = [float(next(iter(c.metric_records.values()))[weight_key]) for c in contents]
        parties = self.reply_ids(replies)
        names = self.names if self.agg is not None else list(records[0].keys())
        known = set(names)

        def same_names(rec, party, what):  # the model's arrays, no fewer and no more
            missing = [n for n in names if n not in rec]
            extra = [n for n in rec.keys() if n not in known]
            if missing or extra:
                raise LayoutMismatch(f"missing from {what}" if missing else f"in {what} only",
                                     leaf=(missing or extra)[0], party=party)

        def read(rec, party):
            for n in names:
                if rec[n].stype != "numpy.ndarray":
                    raise LayoutMismatch(f"serialization {rec[n].stype!r}; expected 'numpy.ndarray'", leaf=n,
                                         party=party)
            return [ndarray_view(rec[n].data, party=party, index=n) for n in names]

        views = []
        for rec, p in zip(records, parties):
            try:  # (other names: the model's arrays changed, if no reply has them; unreadable bytes are its own)
                same_names(rec, p, "the reply")
            except LayoutMismatch as e:
                views.append(_Misfit(e))
                continue
            views.append(_or_refusal(read, rec, party=p))
        if base is not None:  # the model the step moves, as Flower refuses it (an array only there was dropped)
            same_names(base, "<base>", "the strategy's current_arrays")
        # set first: a first round whose finalize raises keeps its aggregator, whose layout has these names
        self.names, self.last_parties = names, parties
        model = None if base is None else [np.asarray(base[n]) for n in names]  # (the reset copies it)
        out = self.without_refused(views, weights, parties, model, server_round, names=names, drop=drop)
        if out is None:
            return None
        arrays = {n: Array(dtype=str(a.dtype), shape=tuple(a.shape), stype="numpy.ndarray", data=t)
                  for n, t, a in zip(names, *out)}
        # in Flower's order, the model's (current_arrays) or this round's first reply's: callers load the record by
        # position (to_numpy_ndarrays -> set_weights), and the first round's order put arrays in other layers
        return ArrayRecord({n: arrays[n] for n in (base if base is not None else records[self.kept[0]]).keys()})


def _flower_optimizer(strategy, ours):
    """Our optimizer with a Flower FedOpt strategy's hyperparameters (``variant="flower"``: Flower's math)."""
    kw = {"lr": strategy.eta, "tau": strategy.tau, "variant": "flower", "beta1": strategy.beta_1}
    if ours is not A.FedAdagrad:
        kw["beta2"] = strategy.beta_2
    return ours(**kw)


def _fedavgm(strategy):
    """Our FedAvgM with a Flower FedAvgM strategy's hyperparameters; plain FedAvg without ``server_opt`` (server
    learning rate 1, momentum 0), as Flower."""
    if strategy.server_opt:
        return A.FedAvgM(lr=strategy.server_learning_rate, momentum=strategy.server_momentum)
    return A.FedAvg()


# Each strategy's algorithm from its hyperparameters, read each round (module functions, not lambdas: a strategy
# copied for a sweep, or sent to a Ray task, is pickled with them)
def _fedavg(strategy):
    return A.FedAvg()


def _median(strategy):
    return R.FedMedian()


def _trimmed(strategy):
    return R.FedTrimmedAvg(beta=strategy.beta)


def _krum(strategy):
    return R.Krum(f=strategy.num_malicious_clients, m=max(1, strategy.num_clients_to_keep), variant="flower")


def _message_krum(strategy):
    return R.Krum(f=strategy.num_malicious_nodes, m=strategy.num_nodes_to_select, variant="flower")


def _metrics(strategy, server_round, results):
    """Fit metrics, aggregated as Flower's FedAvg does (none where no result was kept: Flower's function is never
    called with no results)."""
    if not results:
        return {}
    if strategy.fit_metrics_aggregation_fn:
        return strategy.fit_metrics_aggregation_fn([(res.num_examples, res.metrics) for _, res in results])
    if server_round == 1:
        log.warning("No fit_metrics_aggregation_fn provided")
    return {}


def _strategies():
    """The strategy classes, built on first use so that importing this module needs no flwr."""
    from flwr.server import strategy as fl

    def _fold_rule(flower_cls, make, doc):
        """A strategy whose aggregate_fit is our Aggregator with ``make(strategy)``'s algorithm."""
        class Strategy(flower_cls):
            __doc__ = doc

            def __init__(self, *args, backend: str = "auto", **kwargs):
                super().__init__(*args, **kwargs)
                self._jk = _Runner(functools.partial(make, self), backend)

            def aggregate_fit(self, server_round, results, failures):
                if not results or (not self.accept_failures and failures):
                    return None, {}
                params = self._jk.aggregate(results, drop=self.accept_failures)
                return params, _metrics(self, server_round, self._jk.kept_of(results))

        Strategy.__name__ = flower_cls.__name__
        return Strategy

    FedAvg = _fold_rule(fl.FedAvg, _fedavg,
                        "Flower's FedAvg (``aggregate_fit`` by jitkernels: one fused pass, zero-copy in and out).")

    class FedAvgM(fl.FedAvgM):
        """Flower's FedAvgM: server momentum on the folded average delta (jitkernels.algorithms.FedAvgM)."""

        def __init__(self, *args, backend: str = "auto", **kwargs):
            super().__init__(*args, **kwargs)
            self._jk = _Runner(functools.partial(_fedavgm, self), backend)

        def aggregate_fit(self, server_round, results, failures):
            if not results or (not self.accept_failures and failures):
                return None, {}
            if not self.server_opt:  # lr 1, momentum 0: plain FedAvg, as Flower does
                params = self._jk.aggregate(results, drop=self.accept_failures)
                return params, _metrics(self, server_round, self._jk.kept_of(results))
            if self.initial_parameters is None:
                raise ValueError("When using server-side optimization, model needs to be initialized.")
            # Flower steps from initial_parameters each round (it stores each new model there; a caller may too),
            # and restarts its momentum at round 1 (momentum_vector = pseudo_gradient: a new run's first round)
            params = self._jk.aggregate(results, base=ndarrays_from_parameters(self.initial_parameters),
                                        restart=server_round <= 1, drop=self.accept_failures)
            if params is not None:  # a round where no result weighed keeps the model
                self.initial_parameters = params
            return params, _metrics(self, server_round, self._jk.kept_of(results))

    def _fedopt(flower_cls, ours):
        class Strategy(flower_cls):
            __doc__ = (f"Flower's {flower_cls.__name__} (``variant='flower'`` of "
                       f"jitkernels.algorithms.{ours.__name__}): one fused finalize pass over (average delta, model, "
                       f"moments).")

            def __init__(self, *args, backend: str = "auto", **kwargs):
                super().__init__(*args, **kwargs)
                self._jk = _Runner(functools.partial(_flower_optimizer, self, ours), backend)

            def aggregate_fit(self, server_round, results, failures):
                if not results or (not self.accept_failures and failures):
                    return None, {}
                # Flower steps from current_weights each round (it stores each new model there; a caller may too)
                params = self._jk.aggregate(results, base=self.current_weights, server_round=server_round,
                                            drop=self.accept_failures)
                if params is not None:
                    self.current_weights = ndarrays_from_parameters(params)
                return params, _metrics(self, server_round, self._jk.kept_of(results))

        Strategy.__name__ = flower_cls.__name__
        return Strategy

    def _robust(flower_cls, make):
        return _fold_rule(flower_cls, make, f"Flower's {flower_cls.__name__} by jitkernels' buffered robust kernels "
                                            f"(one slab of the round's updates, cache-blocked selection).")

    return {"FedAvg": FedAvg, "FedAvgM": FedAvgM, "FedAdam": _fedopt(fl.FedAdam, A.FedAdam),
            "FedYogi": _fedopt(fl.FedYogi, A.FedYogi), "FedAdagrad": _fedopt(fl.FedAdagrad, A.FedAdagrad),
            "FedMedian": _robust(fl.FedMedian, _median), "FedTrimmedAvg": _robust(fl.FedTrimmedAvg, _trimmed),
            "Krum": _robust(fl.Krum, _krum)}


def _array_in_place(a, key):
    """A flwr ``Array`` as numpy: a read-only view of its bytes where they hold one ``.npy`` array and nothing more
    (as a step's own record does), else Flower's ``Array.numpy()`` (np.load's copy, which takes trailing bytes; the
    view refused them, where Flower's FedAvgM stepped: found in review)."""
    if a.stype == "numpy.ndarray":
        try:
            return ndarray_view(a.data, party="<base>", index=key)
        except LayoutMismatch:
            pass
    return a.numpy()


def _message_runner(strategy, make, backend, accept_failures) -> None:
    """A Message API strategy's _Runner, and its ``accept_failures`` (which Flower's Message strategies lack: they
    leave out replies that carry an error, and ours leave out, as well, replies that cannot be aggregated for what
    they are themselves, see :meth:`_Runner.without_refused`; False raises those)."""
    strategy._jk = _Runner(functools.partial(make, strategy), backend)
    strategy.accept_failures = A.flag("accept_failures", accept_failures)


def _train(strategy, server_round, replies, base=lambda: None, selected=None):
    """``aggregate_train``'s body: Flower's checks of the replies (those with errors left out; inconsistent ones
    raise), the model they step from (``base()``, asked for only where some reply is valid, as Flower's do), our
    aggregate of the replies kept, and their metrics (``selected(strategy, contents)``: those whose metrics are
    aggregated, by default those kept). (None, None) where no reply is kept."""
    valid, _ = strategy._check_and_log_replies(replies, is_train=True)
    if not valid:
        return None, None
    contents = [msg.content for msg in valid]
    arrays = strategy._jk.aggregate_records(valid, strategy.weighted_by_key, base=base(), server_round=server_round,
                                            drop=strategy.accept_failures)
    if arrays is None:
        return None, None
    chosen = strategy._jk.kept_of(contents) if selected is None else selected(strategy, contents)
    return arrays, strategy.train_metrics_aggr_fn(chosen, strategy.weighted_by_key)


def _message_strategies():
    """Strategies of Flower's Message API (``flwr.serverapp.strategy``): the same aggregation behind
    ``aggregate_train``."""
    from flwr.serverapp import strategy as ms

    def _train_rule(flower_cls, make, doc, selected=None):
        """A strategy whose aggregate_train is our Aggregator with ``make(strategy)``'s algorithm;
        ``selected(strategy, contents)``: the replies whose metrics are aggregated (default: those kept)."""
        class Strategy(flower_cls):
            __doc__ = doc

            def __init__(self, *args, backend: str = "auto", accept_failures: bool = True, **kwargs):
                super().__init__(*args, **kwargs)
                _message_runner(self, make, backend, accept_failures)

            def aggregate_train(self, server_round, replies):
                return _train(self, None, replies, selected=selected)

        Strategy.__name__ = "Message" + flower_cls.__name__
        return Strategy

    MessageFedAvg = _train_rule(ms.FedAvg, _fedavg, "``flwr.serverapp.strategy.FedAvg`` with "
                                "``aggregate_train`` by jitkernels (zero-copy in and out).")

    def _fedopt(flower_cls, ours):
        class Strategy(flower_cls):
            __doc__ = (f"``flwr.serverapp.strategy.{flower_cls.__name__}`` with ``aggregate_train`` by jitkernels "
                       f"(``variant='flower'`` of jitkernels.algorithms.{ours.__name__}: one fused finalize pass).")

            def __init__(self, *args, backend: str = "auto", accept_failures: bool = True, **kwargs):
                super().__init__(*args, **kwargs)
                _message_runner(self, functools.partial(_flower_optimizer, ours=ours), backend, accept_failures)

            def aggregate_train(self, server_round, replies):
                def base():  # Flower steps from current_arrays, which configure_train sets each round to those sent
                    if self.current_arrays is None:
                        raise ValueError("Current arrays not set. Ensure that `configure_train` has been called "
                                         "before aggregation.")
                    return self.current_arrays

                return _train(self, server_round, replies, base)

        Strategy.__name__ = "Message" + flower_cls.__name__
        return Strategy

    def _robust(flower_cls, make):
        return _train_rule(flower_cls, make, f"``flwr.serverapp.strategy.{flower_cls.__name__}`` by jitkernels' "
                                             f"buffered robust kernels (the replies are read, not popped: Flower's "
                                             f"version empties them).")

    class MessageFedAvgM(ms.FedAvgM):
        """``flwr.serverapp.strategy.FedAvgM`` with ``aggregate_train`` by jitkernels: server momentum on the folded
        average delta in one fused pass (plain FedAvg when lr is 1 and momentum 0, as Flower)."""

        def __init__(self, *args, backend: str = "auto", accept_failures: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            _message_runner(self, _fedavgm, backend, accept_failures)

        def aggregate_train(self, server_round, replies):
            def base():
                if not self.server_opt:
                    return None
                if self.current_arrays is None:
                    raise ValueError("No initial parameters set for FedAvgM. Ensure that `configure_train` has been "
                                     "called before aggregation.")
                # Flower steps from current_arrays each round (configure_train sets it once, each step after); read
                # in place (the last step's record: the state's own model, not copied in again, see _Runner.model)
                return {k: _array_in_place(a, k) for k, a in self.current_arrays.items()}

            arrays, metrics = _train(self, None, replies, base)
            if self.server_opt and arrays is not None:
                self.current_arrays = arrays
            return arrays, metrics

    def _krum_rule(flower_cls):
        def kept(st, contents):  # the replies Krum kept, by increasing score (Flower's order)
            index = {p: i for i, p in enumerate(st._jk.last_parties)}
            return [contents[index[p]] for p in st._jk.algorithm.selected]

        return _train_rule(flower_cls, _message_krum,
                           f"``flwr.serverapp.strategy.{flower_cls.__name__}`` by jitkernels' Krum (distances from "
                           f"one float64 Gram pass over the round's slab): the weighted average of the selected "
                           f"replies, their metrics aggregated as Flower does (over the selected replies only).", kept)

    return {"MessageFedAvg": MessageFedAvg, "MessageFedAvgM": MessageFedAvgM,
            "MessageKrum": _krum_rule(ms.Krum), "MessageMultiKrum": _krum_rule(ms.MultiKrum),
            "MessageFedMedian": _robust(ms.FedMedian, _median), "MessageFedTrimmedAvg": _robust(ms.FedTrimmedAvg, _trimmed),
            "MessageFedAdam": _fedopt(ms.FedAdam, A.FedAdam),
            "MessageFedYogi": _fedopt(ms.FedYogi, A.FedYogi), "MessageFedAdagrad": _fedopt(ms.FedAdagrad, A.FedAdagrad)}


@functools.lru_cache(maxsize=None)
def _classes():
    classes = {**_strategies(), **_message_strategies()}
    for name, cls in classes.items():  # pickled by reference, as module.qualname (which __getattr__ resolves):
        cls.__qualname__ = name  # "_strategies.<locals>.FedAvgM" was no name a pickle finds
    return classes


def __getattr__(name):  # module-level lazy classes: ``from jitkernels.integrations.flower import FedAdam``
    if name in ("FedAvg", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "FedMedian", "FedTrimmedAvg", "Krum",
                "MessageFedAvg", "MessageFedAvgM", "MessageFedAdam", "MessageFedYogi", "MessageFedAdagrad",
                "MessageFedMedian", "MessageFedTrimmedAvg", "MessageKrum", "MessageMultiKrum"):
        return _classes()[name]
    raise AttributeError(name)

"""Model-based (stateful) test of jitkernels.Aggregator.

Drives random sequences of fold / admit+fold / fold_many (with bad items) / merge / save+load+from_state /
reset / finalize(out=) over three aggregators of one random configuration, against a reference model: the list of
(party, weight, update) folded into each aggregator.

AGGSM_EXAMPLES (default 300) and AGGSM_STEPS (default 40) size a run (a long one: 2,000 x 50 passed, 2026-11-28).
"""
from __future__ import annotations

import math
import os
import tempfile
import itertools
from decimal import Decimal
from fractions import Fraction

import ml_dtypes
import numpy as np
import hypothesis.strategies as hs
from hypothesis import settings, HealthCheck, Phase
from hypothesis import event, note
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, invariant, precondition

import jitkernels as jk
from jitkernels import algorithms as A

BF16 = np.dtype(ml_dtypes.bfloat16)
N_AGG = 3
_counter = itertools.count()


def _event(x):
    try:
        event(x)
    except Exception:
        pass


def fresh_party():
    n = next(_counter)
    return n if n % 3 == 0 else f"q{n}"  # int ids too (Flower's node ids)


def fp(a):
    return np.asarray(a).tobytes()


def snapshot(agg):
    st = agg.state
    g = lambda a: None if a is None else np.asarray(a).tobytes()
    return (g(st.acc), g(st.lo), g(st.leaf_weight), tuple(st.parties.items()), repr(sorted(st.info.items())),
            g(st.base), None if st.opt is None else tuple((k, g(v)) for k, v in sorted(st.opt.items())),
            st.round, st.closed, tuple(sorted(st.absent.items(), key=repr)), st.torn)


class Cfg:
    pass


class AggMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.aggs = []
        self.models = []  # per agg: list of (party, weight, dict update)
        self.bases = []  # per agg: the base (float64 flat per leaf dict) the current round's folds use
        self.closed_result = {}  # agg index -> the bits of the finalize that closed its round
        self.pending = []  # (admitted, source agg index, party, weight, update)
        self.tmp = tempfile.TemporaryDirectory(prefix="aggsm_")

    def teardown(self):
        self.tmp.cleanup()

    # ------------------------------------------------------------------ setup
    @initialize(backend=hs.sampled_from(["numpy", "numba", "cpp"]), det=hs.booleans(),
                alg=hs.sampled_from(["fedavg", "fedavg_unweighted", "fedadam", "fedavg_base"]),
                half=hs.sampled_from(["bfloat16", "float16"]), int_rule=hs.sampled_from(["mean", "max"]),
                partial=hs.booleans(), acc=hs.sampled_from([None, "float64"]), seed=hs.integers(0, 2 ** 32 - 1))
    def setup(self, backend, det, alg, half, int_rule, partial, acc, seed):
        if backend == "numba" and half == "float16":
            half = "bfloat16"
        if alg == "fedadam":
            partial = False  # (supports_partial False)
        c = self.cfg = Cfg()
        c.backend, c.det, c.alg, c.int_rule, c.partial = backend, det, alg, int_rule, partial
        c.half = np.dtype(np.float16) if half == "float16" else BF16
        c.acc = "float64" if det else acc
        c.rng = np.random.default_rng(seed)
        self.template = {"w": np.zeros(3, np.float32), "h": np.zeros((2, 2), c.half), "n": np.zeros(2, np.int64),
                         "b": np.zeros(1, np.bool_)}
        note(f"config backend={backend} det={det} alg={alg} half={c.half} int={int_rule} partial={partial} acc={c.acc}")
        self.base0 = self.rand_update(scale=1.0) if alg in ("fedadam", "fedavg_base") else None
        for _ in range(N_AGG):
            self.aggs.append(self.make())
            self.models.append([])
            self.bases.append(self.base_of(self.aggs[-1]))

    def algorithm(self):
        a = self.cfg.alg
        if a == "fedadam":
            return A.FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
        return "fedavg_unweighted" if a == "fedavg_unweighted" else "fedavg"

    def make(self):
        c = self.cfg
        return jk.Aggregator(self.template, self.algorithm(), backend=c.backend, acc_dtype=c.acc,
                             base=self.base0, int_leaves=c.int_rule, partial=c.partial, deterministic=c.det)

    def base_of(self, agg):
        st = agg.state
        if st.base is None:
            return None
        b = np.array(st.base, np.float64)  # (a copy: a server step moves the state's base in place)
        return {l.name: b[l.offset:l.offset + l.size].reshape(l.shape) for l in agg.layout.leaves}

    def rand_update(self, scale=4.0, drop=False):
        r = self.cfg.rng
        u = {"w": (r.standard_normal(3) * scale).astype(np.float32),
             "h": (r.standard_normal((2, 2)) * scale).astype(self.cfg.half),
             "n": r.integers(0, 1000, 2).astype(np.int64), "b": r.integers(0, 2, 1).astype(np.bool_)}
        if drop and self.cfg.partial and r.random() < 0.5:
            for name in r.choice(["w", "h", "n", "b"], size=int(r.integers(1, 4)), replace=False):
                del u[name]
        return u

    def rand_weight(self):
        r = self.cfg.rng
        ws = [1, 2, 3.5, 10, 0.25, 100, 7, 1 / 3, np.float32(2.5), Fraction(1, 3), Decimal("0.1"), np.array([4.0]),
              np.int64(12), 10 ** 4]
        return ws[r.integers(0, len(ws))]

    # ------------------------------------------------------------------ expectations
    def mass(self, w):
        if self.cfg.alg == "fedavg_unweighted":
            return 1.0
        return float(w.item()) if isinstance(w, np.ndarray) else float(w)

    def check_state(self, i):
        """The accumulator and records against the model, after every step."""
        agg, model = self.aggs[i], self.models[i]
        st = agg.state
        assert st.torn is None
        assert dict(st.parties) == {p: self.mass(w) for p, w, _ in model}, (st.parties, model)
        if st.closed:
            return
        val = np.asarray(st.value(), np.float64)
        eps = np.finfo(np.dtype(st.acc_dtype)).eps
        base = self.bases[i]
        k = len(model)
        for li, l in enumerate(agg.layout.leaves):
            lw = sum(self.mass(w) for p, w, u in model if l.name in u)
            assert math.isclose(st.leaf_weight[li], lw, rel_tol=1e-12), (l.name, st.leaf_weight, lw)
            got = val[l.offset:l.offset + l.size].reshape(l.shape)
            if l.is_float:
                b = 0 if base is None else base[l.name]
                terms = [self.mass(w) * (u[l.name].astype(np.float64) - b) for p, w, u in model if l.name in u]
            else:
                terms = [self.mass(w) * u[l.name].astype(np.float64) for p, w, u in model if l.name in u]
            if self.cfg.int_rule == "max" and not l.is_float:
                ref = np.max([u[l.name] for p, w, u in model if l.name in u], axis=0) if terms else np.zeros(l.shape)
                assert np.array_equal(got, ref), (l.name, got, ref)
                continue
            ref = np.sum(terms, axis=0) if terms else np.zeros(l.shape)
            mag = np.sum(np.abs(terms), axis=0) if terms else np.zeros(l.shape)
            tol = (k + 2) * eps * (mag + (0 if base is None or not l.is_float else np.abs(base[l.name]) * lw)) + 1e-300
            if st.deterministic:  # terms are resolved to bound * 2^-56 (absolute)
                tol = tol + (k + 1) * 2.0 ** (st.bound_log2 - 56)
            assert np.all(np.abs(got - ref) <= tol), (l.name, got, ref, tol)

    def expect_fail(self, fn, i, why):
        snap = snapshot(self.aggs[i])
        try:
            fn()
        except jk.AggregationError as e:
            note(f"  refused as expected ({why}): {type(e).__name__}: {e}")
            _event(f"refused: {type(e).__name__}")
        else:
            raise AssertionError(f"expected a refusal ({why}); the call succeeded")
        assert snapshot(self.aggs[i]) == snap, f"state changed by a refused call ({why})"

    # ------------------------------------------------------------------ rules
    @rule(i=hs.integers(0, N_AGG - 1), reuse_party=hs.booleans())
    def fold_raw(self, i, reuse_party):
        agg, model = self.aggs[i], self.models[i]
        u, w = self.rand_update(drop=True), self.rand_weight()
        if reuse_party and model:
            p = model[self.cfg.rng.integers(len(model))][0]
            note(f"agg{i}.fold(dup party {p})")
            self.expect_fail(lambda: agg.fold(u, weight=w, party=p), i, "party already folded")
            return
        p = fresh_party()
        note(f"agg{i}.fold({p}, w={w}, leaves={sorted(u)})")
        if agg.state.closed:
            self.expect_fail(lambda: agg.fold(u, weight=w, party=p), i, "round closed")
            return
        agg.fold(u, weight=w, party=p)
        model.append((p, w, u))

    @rule(i=hs.integers(0, N_AGG - 1))
    def admit_only(self, i):
        agg = self.aggs[i]
        u, w, p = self.rand_update(drop=True), self.rand_weight(), fresh_party()
        note(f"a = agg{i}.admit({p}, w={w})")
        a = agg.admit(u, weight=w, party=p)
        self.pending.append((a, i, p, w, u))

    @precondition(lambda self: self.pending)
    @rule(i=hs.integers(0, N_AGG - 1), n=hs.integers(1, 3))
    def fold_pending(self, i, n):
        agg, model = self.aggs[i], self.models[i]
        batch = self.pending[:n]
        del self.pending[:n]
        parties = [p for _, _, p, _, _ in batch]
        folded = {q for q, _, _ in model}
        note(f"agg{i}.fold_many(admitted {parties})")
        # each admitted update may be folded once (into one aggregator): the pool forgets it, so that the same party
        # does not go into two aggregators and make a merge overlap in a way the model does not know
        call = (lambda: agg.fold(batch[0][0])) if len(batch) == 1 else (lambda: agg.fold_many([b[0] for b in batch]))
        if agg.state.closed or folded & set(parties):
            self.expect_fail(call, i, "closed or already folded")
            return
        call()
        model.extend((p, w, u) for _, _, p, w, u in batch)

    @rule(i=hs.integers(0, N_AGG - 1), k=hs.integers(1, 4), bad=hs.sampled_from(
        [None, None, "nan", "inf", "shape", "extra", "w0", "wneg", "winf", "wnan", "wbool", "dup_batch",
         "dup_folded", "missing", "wstr", "wcomplex", "wbig", "wtiny", "info", "pfloat", "pbig", "plong", "dup_np",
         "wrongtype", "empty"]), pos=hs.integers(0, 3))
    def fold_many_raw(self, i, k, bad, pos):
        agg, model = self.aggs[i], self.models[i]
        ups = [self.rand_update(drop=True) for _ in range(k)]
        ws = [self.rand_weight() for _ in range(k)]
        ps = [fresh_party() for _ in range(k)]
        j = pos % k
        if bad == "missing" and self.cfg.partial:
            bad = "extra"
        if bad in ("nan", "inf"):
            ups[j] = dict(ups[j])
            leaf = "w" if "w" in ups[j] else "h"
            if leaf not in ups[j]:
                ups[j][leaf] = self.rand_update()[leaf]
            arr = ups[j][leaf].copy()
            arr.reshape(-1)[0] = np.nan if bad == "nan" else -np.inf
            ups[j][leaf] = arr
        elif bad == "shape":
            ups[j] = dict(ups[j]); ups[j]["w"] = np.zeros(4, np.float32)
        elif bad == "extra":
            ups[j] = dict(ups[j]); ups[j]["zz"] = np.zeros(1, np.float32)
        elif bad == "missing":
            ups[j] = dict(ups[j]); del ups[j]["h"]
        elif bad in ("w0", "wneg", "winf", "wnan", "wbool", "wstr", "wcomplex", "wbig", "wtiny"):
            ws[j] = {"w0": 0, "wneg": -1.0, "winf": math.inf, "wnan": math.nan, "wbool": True, "wstr": "2",
                     "wcomplex": 2 + 0j, "wbig": 10 ** 400, "wtiny": Fraction(1, 10 ** 400)}[bad]
        elif bad in ("pfloat", "pbig", "plong"):
            ps[j] = {"pfloat": 1.5, "pbig": 1 << 64, "plong": "x" * 70000}[bad]
        elif bad == "dup_np":
            ints = [p for p, _, _ in model if type(p) is int]
            if ints:
                ps[j] = np.uint64(ints[0]) if ints[0] >= 0 else np.int64(ints[0])
            else:
                bad = None
        elif bad == "wrongtype":
            ups[j] = dict(ups[j]); ups[j]["zz"] = "not an array"; del ups[j]["zz"]
            ups[j] = [ups[j][n] for n in sorted(ups[j])]  # a list where a dict is the template
        elif bad == "empty":
            ups[j] = {}
        elif bad == "dup_batch":
            if k == 1:
                bad = None
            else:
                ps[j] = ps[(j + 1) % k]
        elif bad == "dup_folded":
            if model:
                ps[j] = model[0][0]
            else:
                bad = None
        note(f"agg{i}.fold_many(k={k}, bad={bad} at {j}, parties={ps}, w={ws})")
        infos = None
        if bad == "info":
            infos = [{} for _ in range(k)]
            infos[j] = {"steps": 3}
        call = lambda: agg.fold_many(ups, ws, parties=ps, infos=infos)
        if bad is not None or agg.state.closed:
            self.expect_fail(call, i, bad or "closed")
            return
        call()
        model.extend(zip(ps, ws, ups))

    @rule(i=hs.integers(0, N_AGG - 1), j=hs.integers(0, N_AGG - 1), as_state=hs.booleans())
    def merge(self, i, j, as_state):
        a, b = self.aggs[i], self.aggs[j]
        src = b.state if as_state else b
        sa, sb = a.state, b.state
        overlap = {p for p, _, _ in self.models[i]} & {p for p, _, _ in self.models[j]}
        same_base = (sa.base is None) == (sb.base is None) and (sa.base is None or fp(sa.base) == fp(sb.base))
        same_opt = (sa.opt is None or sb.opt is None) or all(fp(sa.opt[k]) == fp(sb.opt[k]) for k in sa.opt)
        ok = not overlap and not sa.closed and not sb.closed and sa.round == sb.round and same_base and same_opt
        note(f"agg{i}.merge(agg{j}{'.state' if as_state else ''})  expect ok={ok}")
        if not ok:
            snap_b = snapshot(b)
            self.expect_fail(lambda: a.merge(src), i, f"overlap={overlap} or closed/round/base")
            assert snapshot(b) == snap_b
            return
        snap_b = snapshot(b)
        a.merge(src)
        _event(f"merge ok ({len(self.models[j])} parties)" if self.models[j] else "merge ok (empty)")
        assert snapshot(b) == snap_b, "merge changed its source"
        self.models[i] = self.models[i] + list(self.models[j])

    @rule(i=hs.integers(0, N_AGG - 1))
    def save_load(self, i):
        agg = self.aggs[i]
        path = os.path.join(self.tmp.name, f"s{next(_counter)}.jkstate")
        note(f"agg{i} = from_state(load(save(agg{i}.state)))")
        before = snapshot(agg)
        agg.state.save(path)
        st = jk.FoldState.load(path)
        os.unlink(path)
        new = jk.Aggregator.from_state(st, backend=self.cfg.backend, partial=self.cfg.partial)
        assert snapshot(new) == before, "save/load/from_state did not round-trip bit for bit"
        self.aggs[i] = new

    @rule(i=hs.integers(0, N_AGG - 1), reuse=hs.booleans(), newbase=hs.booleans())
    def reset(self, i, reuse, newbase):
        agg = self.aggs[i]
        nb = None
        if newbase and self.base0 is not None and self.cfg.rng.random() < 0.5:
            nb = self.rand_update(scale=1.0)
        note(f"agg{i}.reset(reuse={reuse}, base={'new' if nb is not None else None})")
        agg.reset(base=nb, reuse=reuse)
        assert agg.state.count == 0 and not agg.state.closed
        self.models[i] = []
        self.closed_result.pop(i, None)
        self.bases[i] = self.base_of(agg)
        if nb is not None:
            for name in nb:
                assert np.array_equal(self.bases[i][name],
                                      np.asarray(nb[name], np.dtype(agg.acc_dtype)).astype(np.float64))

    @rule(i=hs.integers(0, N_AGG - 1), use_out=hs.booleans(), twice=hs.booleans())
    def finalize(self, i, use_out, twice):
        agg, model = self.aggs[i], self.models[i]
        note(f"agg{i}.finalize(out={use_out})")
        if not model:
            self.expect_fail(lambda: agg.finalize(), i, "empty")
            return
        names = [l.name for l in agg.layout.leaves]
        carried = {n: [(w, u) for p, w, u in model if n in u] for n in names}
        if self.bases[i] is None and any(not v for v in carried.values()):
            self.expect_fail(lambda: agg.finalize(), i, "a leaf nobody carried, no base")
            return
        st = agg.state
        was_closed = st.closed
        pre = None
        if self.cfg.alg == "fedadam" and not was_closed:
            pre = {k: np.asarray(v, np.float64).copy() for k, v in st.opt.items()}
            pre["x"] = np.asarray(st.base, np.float64).copy()
        det_ref = None
        if self.cfg.det and not was_closed:
            det_ref = self.replay(i)
        out = None
        if use_out:
            out = {l.name: np.full(l.shape, 77, l.dtype if l.dtype != "bfloat16" else BF16) for l in agg.layout.leaves}
            res = agg.finalize(out=out)
            assert res is out
        else:
            res = agg.finalize()
        _event(f"finalize ok (det={self.cfg.det}, alg={self.cfg.alg}, closed before={was_closed})")
        if twice:
            res2 = agg.finalize()
            for n in names:
                assert fp(res2[n]) == fp(res[n]), f"finalize twice differs on {n}"
        self.check_result(i, res, carried, pre, was_closed)
        if agg.state.closed:
            bits = {n: fp(res[n]) for n in names}
            if was_closed:
                assert bits == self.closed_result[i], "finalize of a closed round differs from the one that closed it"
            else:
                self.closed_result[i] = bits
        if det_ref is not None:
            ref_res, ref_state = det_ref
            for n in names:
                assert fp(ref_res[n]) == fp(res[n]), (f"deterministic: replay in another order/batching differs on {n}",
                                                      ref_res[n], res[n])

    def replay(self, i):
        """Deterministic mode: the model's updates folded in sorted party order, in random batches, on another CPU
        backend, into a fresh state that continues this one's round (same base and moments)."""
        agg = self.aggs[i]
        st = agg.state.copy()
        nr = st.next_round()
        choices = ["numpy", "cpp"] + (["numba"] if self.cfg.half == BF16 else [])
        be = choices[self.cfg.rng.integers(len(choices))]
        fresh = jk.Aggregator.from_state(nr, backend=be, partial=self.cfg.partial)
        items = sorted(self.models[i], key=lambda t: repr(t[0]))[::-1]
        r = self.cfg.rng
        while items:
            n = int(r.integers(1, 4))
            chunk, items = items[:n], items[n:]
            fresh.fold_many([u for _, _, u in chunk], [w for _, w, _ in chunk], parties=[p for p, _, _ in chunk])
        # (the hi/lo split itself depends on the batching: -43.125 + -0.0625 one way, -43.25 + 0.0625 the other;
        # their exact sum, what finalize reads, must not)
        assert fp(fresh.state.value()) == fp(agg.state.value()), f"deterministic: sums differ after replay on {be}"
        return fresh.finalize(), fresh.state

    def check_result(self, i, res, carried, pre, was_closed):
        agg = self.aggs[i]
        st = agg.state
        base = self.bases[i]
        eps = np.finfo(np.dtype(st.acc_dtype)).eps
        k = len(self.models[i])
        for l in agg.layout.leaves:
            got = np.asarray(res[l.name]).astype(np.float64)
            cw = carried[l.name]
            if not l.is_float:
                if not cw:
                    ref = base[l.name] if base is not None else None
                    assert np.array_equal(got, np.rint(np.asarray(ref, np.float64))), (l.name, got, ref)
                    continue
                if self.cfg.int_rule == "max":
                    ref = np.max([u[l.name] for w, u in cw], axis=0)
                    assert np.array_equal(got, ref), (l.name, got, ref)
                else:
                    W = sum(self.mass(w) for w, u in cw)
                    ref = sum(self.mass(w) * u[l.name].astype(np.float64) for w, u in cw) / W
                    assert np.all(np.abs(got - ref) <= 0.5 + 1e-6 * np.abs(ref) + 1e-9), (l.name, got, ref)
                continue
            out_eps = float(ml_dtypes.finfo(l.dtype if l.dtype != "bfloat16" else BF16).eps)
            b = 0.0 if base is None else base[l.name]
            if not cw:  # nobody carried it: the base's value
                ref = b
                mag = np.abs(b)
            else:
                W = sum(self.mass(w) for w, u in cw)
                terms = [self.mass(w) * (u[l.name].astype(np.float64) - b) for w, u in cw]
                d = np.sum(terms, axis=0) / W
                mag = np.abs(b) + np.sum(np.abs(terms), axis=0) / W
                if pre is not None or (self.cfg.alg == "fedadam" and was_closed):
                    continue  # checked below against the state's stepped model
                ref = b + d
            tol = (k + 4) * eps * mag + out_eps * np.abs(ref) + 1e-30
            if st.deterministic:
                tol = tol + (k + 1) * 2.0 ** (st.bound_log2 - 56)
            assert np.all(np.abs(got - ref) <= tol), (l.name, got, ref, tol)
        if pre is not None:
            # one Reddi FedAdam step from the pre-finalize moments and model, with the reference mean delta
            m0, v0, x0 = pre["m"], pre["v"], pre["x"]
            newx = np.asarray(st.base, np.float64)
            for l in agg.layout.leaves:
                if not l.is_float or not carried[l.name]:
                    continue
                sl = slice(l.offset, l.offset + l.size)
                cw = carried[l.name]
                W = sum(self.mass(w) for w, u in cw)
                d = (sum(self.mass(w) * (u[l.name].astype(np.float64).reshape(-1) - base[l.name].reshape(-1))
                         for w, u in cw) / W)
                m = 0.9 * m0[sl] + 0.1 * d
                v = 0.99 * v0[sl] + 0.01 * d * d
                x = x0[sl] + 0.1 * m / (np.sqrt(v) + 1e-3)
                tol = 1e-4 * (np.abs(x) + 1) if st.acc_dtype == "float32" else 1e-9 * (np.abs(x) + 1)
                assert np.all(np.abs(newx[sl] - x) <= tol), (l.name, newx[sl], x)
                out_eps = float(ml_dtypes.finfo(l.dtype if l.dtype != "bfloat16" else BF16).eps)
                got = np.asarray(res[l.name], np.float64).reshape(-1)
                assert np.all(np.abs(got - x) <= tol + out_eps * np.abs(x)), (l.name, got, x)

    @invariant()
    def states_match_model(self):
        if not self.aggs:
            return
        for i in range(N_AGG):
            self.check_state(i)


AggMachine.TestCase.settings = settings(max_examples=int(os.environ.get("AGGSM_EXAMPLES", 300)),
                                        stateful_step_count=int(os.environ.get("AGGSM_STEPS", 40)), deadline=None,
                                        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
                                        suppress_health_check=list(HealthCheck))
TestAggregatorStateful = AggMachine.TestCase

r"""Aggregation algorithms: each one readable class whose docstring states its math.

An algorithm decides three numbers per update and, for server optimizers, the step at finalize; the backends' fused
kernels do the rest, so every algorithm runs on every backend:

* ``fold_weight(u, state)``: the multiplier the fold kernel applies, :math:`\mathrm{acc} \mathrel{+}= f_j\,(u_j - b)`;
* ``mass(u)``: what the update adds to the divisor (recorded per party, summed per leaf), :math:`W = \sum_j m_j`;
* ``divisor_scale(state)``: a factor on :math:`W` (a server learning rate, FedNova's effective steps).

Algorithms that change the state at finalize (server optimizers, DP noise) *close* the round: ``noise_std(state)``
(Gaussian noise on the average delta, from :mod:`jitkernels.noise`), the step, then ``close(state)`` (e.g. adaptive
clipping's norm update). Server-side scalars that carry across rounds live in ``state.scalars``.

Finalize returns :math:`b + \mathrm{acc} / (s W)` (or, without a base, :math:`\mathrm{acc} / (s W)`). Per-update
values (``steps``, ``staleness``) arrive as keyword arguments of ``Aggregator.fold`` and are checked by
``check_info``. Weights are computed once, on the host, in float64.

Server optimizers (:class:`FedAvgM`, :class:`FedAdam`, :class:`FedYogi`, :class:`FedAdagrad`) fold deltas against
the global model and apply their step in one fused pass at finalize over (accumulator, model, moments): the kernels
of ``step`` in every backend, with the element-wise math written once (``jk::opt_step`` in csrc/jk_math.h, mirrored
by ``numpy_ref.step``).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .errors import InvalidUpdateInfo, LayoutMismatch
from .parties import real_value

MOMENTUM, NESTEROV, ADAM, YOGI, ADAGRAD = range(5)  # jk::OptKind


def _positive(info: dict, key: str, party, *, allow_zero=False) -> float:
    if key not in info:
        raise InvalidUpdateInfo(party, key, None, "is required by this algorithm")
    x = real_value(info[key])
    if x is None:
        raise InvalidUpdateInfo(party, key, info[key], "must be a number")
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise InvalidUpdateInfo(party, key, info[key], "must be finite and " + (">= 0" if allow_zero else "> 0"))
    return x


class FedAvg:
    r"""Federated averaging (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data").

    .. math::  x = \frac{\sum_j w_j\, u_j}{\sum_j w_j}, \qquad w_j = n_j \text{ (weighted) or } 1 \text{ (unweighted)}

    With a base :math:`b` (the global model) the kernels fold deltas, :math:`x = b + \sum_j w_j (u_j - b) / \sum_j w_j`,
    which keeps rounding noise out of small steps. Streaming: O(model) memory. Bytes moved per element: a fold
    reads each update once and the accumulator twice per batch, ``itemsize(u)`` per update + ``2 * itemsize(acc)``
    (+ ``itemsize(base)`` with a base); admission's stats pass reads each update (and the base) once more, except
    for the first batch of a round into an empty state on cpp, where the two are one pass.
    """

    name = "fedavg"
    needs_base = False
    info_keys: tuple = ()
    kind = None  # server optimizers set their jk::OptKind

    def __init__(self, *, weighted: bool = True):
        self.weighted = flag("weighted", weighted)

    def check_info(self, info: dict, party) -> dict:
        """The per-update values this algorithm reads, validated (a typed error names the party and the key)."""
        if not info:  # the usual case, checked per update of every batch
            return {}
        extra = set(info) - set(self.info_keys)
        if extra:
            key = sorted(extra, key=repr)[0]  # (keys of mixed types raised a bare TypeError sorted by value)
            raise InvalidUpdateInfo(party, key, info[key], f"is not used by {type(self).__name__} "
                                    f"(it reads {', '.join(self.info_keys) or 'nothing'})")
        return {}

    def check_record(self, record: dict, party) -> None:
        """A saved state's record of one party, from a file (a checksum vouches for nothing): the per-update values
        this algorithm reads, checked as on arrival (a FedNova record without ``steps`` raised a bare KeyError at
        finalize; steps of -3 gave a wrong model)."""
        self.check_info({k: record[k] for k in self.info_keys if k in record}, party)

    def mass(self, u) -> float:
        return u.weight if self.weighted else 1.0

    def fold_weight(self, u, state) -> float:
        return self.mass(u)

    def derived_info(self, u, state) -> dict:
        """Per-party values the algorithm derives at fold time and records in the state (besides ``check_info``'s)."""
        return {}

    def divisor_scale(self, state) -> float:
        return 1.0

    def initial_scalars(self) -> dict:
        return {}

    @property
    def closes_round(self) -> bool:
        return self.kind is not None

    @property
    def moves_from_base(self) -> bool:
        """Whether the model finalize gives depends on the base (it steps from it), not only measures the deltas
        from it: FedAvg's ``b + mean(u - b)`` is the mean of the updates whatever ``b`` is, FedNova's, FedBuff's and
        SCAFFOLD's steps are not. Aggregator.reset() after a finalize then starts the next round from the model
        that finalize released."""
        return self.needs_base

    def noise_std(self, state) -> float:
        return 0.0

    def close(self, state) -> None:
        """Called once when finalize closes a round (after the noise and the step)."""

    def params(self) -> dict:
        return {"name": self.name, "weighted": self.weighted}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if k != "name")
        return f"{type(self).__name__}({args})"


class FedProx(FedAvg):
    r"""FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks").

    The proximal term :math:`\frac{\mu}{2}\lVert w - x_t \rVert^2` acts in the parties' local training; the server
    side is :class:`FedAvg`. ``mu`` is recorded with the state (and sent to parties by the caller), so that a saved
    round says which objective produced it. Bytes moved: as FedAvg.
    """

    name = "fedprox"

    def __init__(self, *, mu: float, weighted: bool = True):
        super().__init__(weighted=weighted)
        if not (math.isfinite(number("mu", mu)) and mu >= 0):
            raise ValueError(f"mu must be finite and >= 0, got {mu!r}")
        self.mu = float(mu)

    def params(self) -> dict:
        return {**super().params(), "mu": self.mu}


class FedNova(FedAvg):
    r"""FedNova (Wang et al., 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
    Optimization"): each party's change is normalized by its number of local steps :math:`\tau_j` before averaging,
    and the average is rescaled by the effective number of steps.

    .. math::  x_{t+1} = x_t + \tau_{\mathrm{eff}} \sum_j p_j \frac{u_j - x_t}{\tau_j}, \qquad
               p_j = \frac{n_j}{\sum_i n_i}, \quad \tau_{\mathrm{eff}} = \sum_j p_j \tau_j

    As a fold: fold weight :math:`n_j / \tau_j`, mass :math:`n_j`, divisor scale
    :math:`1 / \sum_j p_j \tau_j` (``math.fsum`` over the recorded parties: the form of
    :math:`\sum_j n_j / \sum_j n_j \tau_j` whose sums cannot overflow). Needs a base
    (:math:`x_t`) and ``steps=`` (:math:`\tau_j`; for local momentum SGD pass FedNova's :math:`\lVert a_j \rVert_1`
    instead). Bytes moved: as FedAvg.
    """

    name = "fednova"
    needs_base = True
    info_keys = ("steps",)
    # tau_eff is a sum over the round's parties, not per leaf: a leaf only some sent took the others' steps in
    supports_partial = False

    def check_info(self, info, party):
        super().check_info(info, party)
        return {"steps": _positive(info, "steps", party)}

    def fold_weight(self, u, state) -> float:
        return self.mass(u) / u.info["steps"]

    def divisor_scale(self, state) -> float:
        # 1 / sum p_j tau_j with p_j = n_j / sum n (not sum n / sum n_j tau_j: n tau = 1e10 x 1e300 overflowed, and
        # the round could not be finalized)
        n, top = state.total_weight, 1.0
        if n == math.inf:  # (weights whose sum is past float64's range: p_j taken from weights scaled by the largest)
            top = max(state.parties.values())
            n = math.fsum(w / top for w in state.parties.values())
        return 1.0 / math.fsum(state.parties[p] / top / n * state.info[p]["steps"] for p in state.parties)


STALENESS = ("constant", "polynomial", "hinge", "nvflare")


class FedBuff(FedAvg):
    r"""Buffered asynchronous aggregation (Nguyen et al., 2022, "Federated Learning with Buffered Asynchronous
    Aggregation"): updates computed against an older model are discounted by their staleness :math:`s_j` (rounds
    since the model they started from), and the buffer's average moves the model by a server learning rate.

    .. math::  x_{t+1} = x_t + \eta_g \frac{\sum_j w_j\, \sigma(s_j)\, (u_j - x_{t-s_j})}{\sum_j w_j}

    (the caller sends deltas, or updates against the current base; :math:`w_j = n_j` or 1). The divisor is the
    undiscounted mass, so stale updates count less without renormalizing (FedBuff's :math:`1/K`). Staleness
    functions :math:`\sigma(s)`:

    * ``"constant"``: 1;
    * ``"polynomial"``: :math:`(1 + s)^{-a}` (FedBuff and FedScale use :math:`a = 1/2`; FedAsync's polynomial form);
    * ``"hinge"``: 1 for :math:`s \le b`, else :math:`1 / (a (s - b) + 1)` (FedAsync, Xie et al., 2019);
    * ``"nvflare"``: :math:`1 / (1 + \sqrt{s})`.

    Per update: ``staleness=`` (>= 0). The learning rate is a divisor scale :math:`1/\eta_g` (one division per
    element, as FedAvg). Bytes moved: as FedAvg.
    """

    name = "fedbuff"
    info_keys = ("staleness",)

    def __init__(self, *, staleness: str = "polynomial", a: float = 0.5, b: float = 4.0, server_lr: float = 1.0,
                 weighted: bool = False):
        super().__init__(weighted=weighted)
        if staleness not in STALENESS:
            raise ValueError(f"staleness must be one of {STALENESS}, got {staleness!r}")
        for name, x in (("a", a), ("b", b)):
            if not (math.isfinite(number(name, x)) and x >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {x!r}")
        _check_rates(server_lr=server_lr)  # (it divides the round's mass in the accumulator: 1e-39 failed every
        self.staleness, self.a, self.b, self.server_lr = staleness, float(a), float(b), float(server_lr)  # finalize)

    def discount(self, s: float) -> float:
        if self.staleness == "polynomial":
            return (1.0 + s) ** -self.a
        if self.staleness == "hinge":
            return 1.0 if s <= self.b else 1.0 / (self.a * (s - self.b) + 1.0)
        if self.staleness == "nvflare":
            return 1.0 / (1.0 + math.sqrt(s))
        return 1.0

    def check_info(self, info, party):
        super().check_info(info, party)
        return {"staleness": _positive(info, "staleness", party, allow_zero=True)}

    def fold_weight(self, u, state) -> float:
        return self.mass(u) * self.discount(u.info["staleness"])

    def divisor_scale(self, state) -> float:
        return 1.0 / self.server_lr

    moves_from_base = True  # (with a base: x + eta_g times the discounted mean delta)

    def params(self) -> dict:
        return {**super().params(), "staleness": self.staleness, "a": self.a, "b": self.b,
                "server_lr": self.server_lr}


class SCAFFOLD(FedAvg):
    r"""SCAFFOLD's server side (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
    Learning", Algorithm 1): the model and the server control variate move in one fold.

    .. math::  x \leftarrow x + \eta_g \frac{1}{|S|} \sum_{i \in S} (y_i - x), \qquad
               c \leftarrow c + \frac{|S|}{N} \frac{1}{|S|} \sum_{i \in S} \Delta c_i
               = c + \frac{1}{N} \sum_{i \in S} \Delta c_i, \qquad \Delta c_i = c_i^+ - c_i

    The template (and every update, and the base) is a dict ``{"model": ..., "control": ...}`` of two trees of the
    same leaves (names below the two keys, shapes, dtypes; one array each is a tree too): party :math:`i` sends its
    new local model :math:`y_i` and, as its control, :math:`c + \Delta c_i` (:meth:`party_control`: the server's
    :math:`c` plus the change of its *own* control variate), the base holds :math:`(x, c)`. Folded against the base,
    the control leaves carry :math:`\Delta c_i`: the paper's update, which keeps :math:`c` the mean of all N parties'
    :math:`c_i` under partial participation (a party that sent :math:`c_i^+` itself would fold
    :math:`c_i^+ - c`, the same only where :math:`c_i = c`). Under the paper's option II,
    :math:`c + \Delta c_i = (x - y_i) / (K \eta_l)`, which a party can send directly. Both trees are leaves of one
    layout, so the control variates are the *second accumulator*, folded in the same pass as the model (bytes:
    twice FedAvg's). Divisor scales per leaf: :math:`1/\eta_g` on model leaves, :math:`N / |S|` on control leaves.
    ``num_parties``: :math:`N`, all parties of the federation. ``weighted=True`` replaces both means over
    :math:`S` by means weighted by sample counts, :math:`c \leftarrow c + \frac{|S|}{N} \sum_i n_i \Delta c_i /
    \sum_i n_i` (not the paper's: :math:`c` then no longer stays the mean of the parties' :math:`c_i`).
    """

    name = "scaffold"
    needs_base = True
    # |S| / N scales by every party folded: a control leaf only some sent moved c by |S| / m times the paper's
    supports_partial = False

    def __init__(self, *, num_parties: int, server_lr: float = 1.0, weighted: bool = False):
        super().__init__(weighted=weighted)
        _check_rates(server_lr=server_lr)  # (as FedBuff's: it divides the round's mass in the accumulator)
        self.num_parties, self.server_lr = _count("num_parties", num_parties), float(server_lr)

    @staticmethod
    def party_control(c, c_new, c_old):
        r"""What a party sends as its ``"control"`` tree: :math:`c + (c_i^+ - c_i)`, leaf by leaf, in the leaves'
        own array type and dtype (the difference first: a small change is not lost against a large :math:`c`).
        ``c``: the server's control variate the party received; ``c_new``, ``c_old``: its own after and before the
        round's local training. Trees of dicts, lists and tuples of the same structure."""
        if isinstance(c, dict):
            return {k: SCAFFOLD.party_control(c[k], c_new[k], c_old[k]) for k in c}
        if isinstance(c, (list, tuple)):
            return type(c)(SCAFFOLD.party_control(*t) for t in zip(c, c_new, c_old, strict=True))
        return c + (c_new - c_old)

    def check_layout(self, layout) -> None:
        """Refuse a template that is not ``{"model": tree, "control": tree}`` with the same leaves in both trees
        (ValueError, naming the first leaf that differs): the control leaves are folded against the control base
        leaf by leaf, and divided by another scale than the model's."""
        td = layout.treedef
        if td["t"] != "dict" or sorted(td["k"]) != ["control", "model"]:
            raise ValueError("SCAFFOLD's template is a dict {'model': tree, 'control': tree} of the same leaves, got "
                             + (f"keys {td['k']}" if td["t"] == "dict" else f"a {td['t']}"))
        trees = {"model": {}, "control": {}}
        for leaf in layout.leaves:  # "model" (one array) or "model.<path>"
            part, _, path = leaf.name.partition(".")
            trees[part][path] = (leaf.shape, leaf.dtype)
        model, control = trees["model"], trees["control"]
        path = next((p for p in [*model, *control] if model.get(p) != control.get(p)), None)
        if path is not None:
            told = [f"{part}{'.' + path if path else ''}: " + (f"{t[path][1]} {t[path][0]}" if path in t else "missing")
                    for part, t in trees.items()]
            raise ValueError(f"SCAFFOLD's model and control trees hold different leaves ({'; '.join(told)})")

    @property
    def max_parties(self) -> int:
        """The Aggregator refuses a party past N on arrival (a fold or merge: ValueOutOfRange, the state as it was)."""
        return self.num_parties

    def divisor_scale(self, state):
        self.check_layout(state.layout)
        if state.count > self.num_parties:  # (c would move by more than the mean of the N parties' changes; folds
            # and merges refuse such a party on arrival, so only a state from elsewhere gets here)
            raise ValueError(f"SCAFFOLD was told num_parties = {self.num_parties} (N, all parties of the federation), "
                             f"and {state.count} parties were folded: N must count every party")
        control = np.array([leaf.name.partition(".")[0] == "control" for leaf in state.layout.leaves])
        return np.where(control, self.num_parties / state.count, 1.0 / self.server_lr)

    def params(self) -> dict:
        return {**super().params(), "num_parties": self.num_parties, "server_lr": self.server_lr}


# --- server optimizers --------------------------------------------------------------------------------------------

VARIANTS = ("reddi", "flower")


class _ServerOptimizer(FedAvg):
    """Shared by the server optimizers: a base is required (the global model the step moves), and finalize runs
    ``step`` with :meth:`coefficients` instead of the plain division. The moments live in the fold state (saved
    with it); the round counter ``t`` counts applied steps."""

    needs_base = True
    moments = 2  # m and v; FedAvgM keeps only m

    def v0(self) -> float:
        return 0.0

    def coefficients(self, t: int) -> tuple:
        """(b1, 1 - b1, b2, 1 - b2, lr_t, tau) for step ``t`` (1-based), in float64."""
        raise NotImplementedError


def number(name: str, x) -> float:
    """``x`` as a float: a real number, not a bool or a string, else ValueError naming ``name`` (True was taken as 1
    and "3" as 3; None and "0.1" failed inside math.isfinite, naming nothing)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a number, got {x!r}")
    return float(x)


def flag(name: str, x) -> bool:
    """``x`` as a bool: True or False (numpy's too), else TypeError naming ``name`` ("no" was truthy: a weighted
    mean, Nesterov momentum, deterministic mode where none was meant)."""
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {x!r}")
    return bool(x)


def _count(name: str, x, minimum: int = 1) -> int:
    """A count >= ``minimum``: an int, or a float with an integral value (2.7 was truncated to 2 without a word)."""
    whole = hasattr(x, "__index__") or isinstance(x, float) and math.isfinite(x) and x.is_integer()
    if isinstance(x, bool) or not whole or int(x) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {x!r}")
    return int(x)


def _check_hyper(**kw):
    for name, (x, lo, hi) in kw.items():
        if not (math.isfinite(number(name, x)) and lo <= x < hi):
            raise ValueError(f"{name} must be in [{lo}, {hi}), got {x!r}")


_F32_RANGE = (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max))


def _check_rates(**kw):
    """Step sizes and tau: finite and > 0 (not bools), and still so in float32, the accumulator they are applied in
    (tau = 1e-50 was 0 there and lr = 1e39 inf: a coordinate whose delta was 0 stepped to NaN, and the NaN model
    was carried into every later round)."""
    for name, x in kw.items():
        if not (math.isfinite(number(name, x)) and _F32_RANGE[0] <= x <= _F32_RANGE[1]):
            raise ValueError(f"{name} must be finite and > 0 (in float32 too: > 1.2e-38 and < 3.4e38), got {x!r}")


class FedAvgM(_ServerOptimizer):
    r"""FedAvg with server momentum (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification").

    .. math::  \Delta_t = \frac{\sum_j w_j (u_j - x_t)}{\sum_j w_j}, \quad m_t = \beta m_{t-1} + \Delta_t, \quad
               x_{t+1} = x_t + \eta\, m_t \quad (\text{Nesterov: } x_{t+1} = x_t + \eta (\Delta_t + \beta m_t))

    Flower's FedAvgM keeps :math:`-m` (a pseudo-gradient) and subtracts it: the same numbers. With ``lr=1,
    momentum=0`` it is FedAvg. One fused pass at finalize: reads acc, x, m; writes x, m and the output (f32 state
    and output: 24 bytes per parameter).
    """

    name = "fedavgm"
    moments = 1

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.0, nesterov: bool = False, weighted: bool = True):
        super().__init__(weighted=weighted)
        _check_hyper(momentum=(momentum, 0.0, 1.0))
        _check_rates(lr=lr)
        self.lr, self.momentum, self.nesterov = float(lr), float(momentum), flag("nesterov", nesterov)
        self.kind = NESTEROV if nesterov else MOMENTUM

    def coefficients(self, t):
        return (self.momentum, 1.0 - self.momentum, 0.0, 1.0, self.lr, 0.0)

    def params(self) -> dict:
        return {**super().params(), "lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov}


class _Adaptive(_ServerOptimizer):
    r"""Adaptive server optimizers (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2).

    .. math::  m_t = \beta_1 m_{t-1} + (1 - \beta_1) \Delta_t, \qquad
               x_{t+1} = x_t + \eta_t \frac{m_t}{\sqrt{v_t} + \tau}

    with :math:`v_t` per subclass and :math:`\Delta_t` the folded average delta (``u - x_t`` in the kernel, never
    the average minus :math:`x_t` afterwards). Two variants:

    * ``"reddi"`` (the paper): :math:`\eta_t = \eta`, :math:`v_{-1} = \tau^2`.
    * ``"flower"`` (flwr's strategies): :math:`v_{-1} = 0`; FedAdam also scales :math:`\eta_t = \eta
      \sqrt{1 - \beta_2^{t+1}} / (1 - \beta_1^{t+1})` (Kingma & Ba's bias correction folded into the step size, with
      Flower's exponent ``server_round + 1``, one more than the step count :math:`t`). Flower computes in the model's
      dtype except that FedAdam's ``eta_norm`` is a numpy float64, which promotes its result to float64 under NEP 50;
      here every variant computes in the accumulator dtype.

    One fused pass at finalize: reads acc, x, m, v; writes x, m, v and the output (f32 state and output: 32 bytes
    per parameter, 28 without keeping the new model in the state).
    """

    def __init__(self, *, lr, beta1, beta2, tau, variant, weighted=True):
        super().__init__(weighted=weighted)
        _check_hyper(beta1=(beta1, 0.0, 1.0), beta2=(beta2, 0.0, 1.0))
        _check_rates(lr=lr, tau=tau)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.lr, self.beta1, self.beta2, self.tau = float(lr), float(beta1), float(beta2), float(tau)
        self.variant = variant

    def v0(self) -> float:
        return self.tau * self.tau if self.variant == "reddi" else 0.0

    def step_size(self, t: int) -> float:
        return self.lr

    def coefficients(self, t):
        return (self.beta1, 1.0 - self.beta1, self.beta2, 1.0 - self.beta2, self.step_size(t), self.tau)

    def params(self) -> dict:
        return {**super().params(), "lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau,
                "variant": self.variant}


class FedAdam(_Adaptive):
    __doc__ = _Adaptive.__doc__ + r"""
    FedAdam: :math:`v_t = \beta_2 v_{t-1} + (1 - \beta_2) \Delta_t^2`.
    """

    name = "fedadam"
    kind = ADAM

    def __init__(self, *, lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-9,
                 variant: str = "reddi", weighted: bool = True):
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, tau=tau, variant=variant, weighted=weighted)
        if variant == "flower":  # its step size lr sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) reaches up to lr / (1 - b1)
            _check_rates(**{"lr / (1 - beta1)": self.lr / (1.0 - self.beta1)})

    def step_size(self, t):
        if self.variant == "flower":
            return self.lr * math.sqrt(1.0 - self.beta2 ** (t + 1)) / (1.0 - self.beta1 ** (t + 1))
        return self.lr


class FedYogi(_Adaptive):
    __doc__ = _Adaptive.__doc__ + r"""
    FedYogi: :math:`v_t = v_{t-1} - (1 - \beta_2) \Delta_t^2 \operatorname{sign}(v_{t-1} - \Delta_t^2)`.
    """

    name = "fedyogi"
    kind = YOGI

    def __init__(self, *, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 variant: str = "reddi", weighted: bool = True):
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, tau=tau, variant=variant, weighted=weighted)


class FedAdagrad(_Adaptive):
    __doc__ = _Adaptive.__doc__ + r"""
    FedAdagrad: :math:`v_t = v_{t-1} + \Delta_t^2` (:math:`\beta_2` unused; Flower's default :math:`\beta_1 = 0`).
    """

    name = "fedadagrad"
    kind = ADAGRAD

    def __init__(self, *, lr: float = 0.1, beta1: float = 0.0, tau: float = 1e-9, variant: str = "reddi",
                 weighted: bool = True):
        super().__init__(lr=lr, beta1=beta1, beta2=0.0, tau=tau, variant=variant, weighted=weighted)

    def params(self) -> dict:
        p = super().params()
        del p["beta2"]
        return p


# --- differential privacy -----------------------------------------------------------------------------------------

class _DPClipping:
    """Shared by the DP wrappers: delegate to the inner algorithm, clip each update's delta by scaling its fold
    weight, add Gaussian noise to the average delta at finalize."""

    needs_base = True
    needs_norms = True  # the fold weights need the admission stats first

    def __init__(self, algorithm, *, noise_multiplier, num_sampled, seed):
        self.inner = resolve(algorithm)
        if isinstance(self.inner, _DPClipping):
            raise ValueError("DP wrappers do not nest")
        if getattr(self.inner, "buffered", False):
            raise ValueError(f"DP wrappers take streaming algorithms; {type(self.inner).__name__} is buffered")
        if not (math.isfinite(number("noise_multiplier", noise_multiplier)) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.num_sampled = None if num_sampled is None else _count("num_sampled", num_sampled)
        from .noise import _uint, new_seed

        self.seed = new_seed() if seed is None else _uint("seed", seed, 64)
        self.seed_given = seed is not None  # (a restarted scheduler job compares its saved seed only if so)

    # delegated: the inner algorithm's weights, optimizer and per-update values
    def __getattr__(self, name):
        if name in ("kind", "moments", "v0", "coefficients", "info_keys", "check_info", "check_record", "mass",
                    "divisor_scale", "supports_partial"):
            return getattr(self.inner, name)
        raise AttributeError(name)

    def check_layout(self, layout) -> None:
        """Integer and bool leaves are refused: they are averaged exactly (neither clipped nor noised), so a party's
        value would move the released model by value / k and the guarantee would not cover it. (Flower's server-side
        DP fails on them too: numpy will not add float noise to an int array.)"""
        inner = getattr(self.inner, "check_layout", None)
        if inner is not None:
            inner(layout)
        bad = next((leaf for leaf in layout.leaves if not leaf.is_float), None)
        if bad is not None:
            raise LayoutMismatch(f"{type(self).__name__} clips and noises float leaves only; this {bad.dtype} leaf "
                                 "would be released un-noised: leave integer leaves (BatchNorm's "
                                 "num_batches_tracked) out of the template and the updates", leaf=bad.name)

    def clip_norm(self, state) -> float:
        raise NotImplementedError

    def clip_factor(self, u, state) -> float:
        c = self.clip_norm(state)  # u.norm is ||u - base||: the Aggregator re-measures updates admitted without it
        return 1.0 if u.norm <= c else c / u.norm

    def fold_weight(self, u, state) -> float:
        return self.inner.fold_weight(u, state) * self.clip_factor(u, state)

    def derived_info(self, u, state) -> dict:
        return self.inner.derived_info(u, state)

    def initial_scalars(self) -> dict:
        return self.inner.initial_scalars()

    @property
    def closes_round(self) -> bool:
        return True

    def cohort(self, state) -> int:
        """min(m, k): m = ``num_sampled`` (else k), k = the parties folded this round. The unweighted average divides
        each leaf by k (the inner algorithm's divisor scale then scales noise and deltas alike), so one party's
        clipped delta moves it by up to C / k; where more than m report, the std stays Flower's sigma * C / m."""
        return state.count if self.num_sampled is None else min(self.num_sampled, state.count)

    def noise_std(self, state) -> float:
        """sigma * C / min(m, k) on the average delta (McMahan et al., 2018; Flower's ``compute_stdv`` with m): the
        sensitivity of an unweighted average of the round's k updates clipped to C, see :meth:`cohort`."""
        return self.noise_multiplier * self.clip_norm(state) / self.cohort(state)

    def close(self, state) -> None:
        self.inner.close(state)

    def _params(self) -> dict:
        return {"noise_multiplier": self.noise_multiplier, "num_sampled": self.num_sampled, "seed": self.seed,
                "algorithm": self.inner.params()}

    def __repr__(self):
        p = {k: v for k, v in self.params().items() if k not in ("name", "seed")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in p.items())})"


class DPFixedClipping(_DPClipping):
    r"""Central differential privacy with fixed clipping, server side (McMahan et al., 2018, "Learning
    Differentially Private Recurrent Language Models"; Flower's ``DifferentialPrivacyServerSideFixedClipping``).

    .. math::  \Delta_j = u_j - x_t, \quad \bar\Delta_j = \Delta_j \min\Big(1, \frac{C}{\lVert \Delta_j \rVert_2}\Big),
               \quad \tilde\Delta = \frac{\sum_j w_j \bar\Delta_j}{\sum_j w_j} + \mathcal{N}\Big(0,
               \big(\tfrac{\sigma C}{\min(m, k)}\big)^2 I\Big)

    over the round's :math:`k` folded parties, :math:`m` = ``num_sampled`` (else :math:`k`). One party moves the
    unweighted average by up to :math:`C / k`, so where fewer than :math:`m` report (dropouts) the noise grows to
    keep the multiplier :math:`\sigma` for that cohort; Flower keeps :math:`\sigma C / m` and only warns, which at
    :math:`k = 2` of :math:`m = 10` is an effective multiplier of :math:`0.2 \sigma`. Then the inner algorithm's
    finalize (FedAvg: :math:`x_t + \tilde\Delta`; a server optimizer steps on :math:`\tilde\Delta`, where Flower
    would noise the optimizer's output). The norms come from admission's stats pass, so clipping is a scaled fold:
    the clipped fold moves the bytes of the stats pass plus the fold, nothing more. The noise is Philox-keyed by
    (key, round, leaf, index), the key an HMAC under the seed of the aggregate it noises
    (:func:`jitkernels.noise.aggregate_key`): two aggregates that differ get independent noise, however many
    aggregators, copies or saved states share the seed; the same aggregate gets the same bits on every backend and
    thread count, and after a restart. The sensitivity bound assumes an unweighted average (``weighted=False``, the
    default here) of whole updates; with sample-count weights a party moves the average by up to :math:`w_j C / W`,
    and with partial updates a leaf that fewer parties carried by up to :math:`C` over their number, which Flower's
    std (and this one) does not account for.

    The noise goes on the average delta before the inner algorithm scales it (FedBuff's ``server_lr`` scales the
    noise with the step, so the ratio to one party's reach stays ``sigma``). FedNova inside reweights parties by their
    local steps: one party's reach is then not :math:`C / k`, and ``noise_multiplier`` must be calibrated for it.

    Caveats: floating-point noise is not exactly the Gaussian mechanism (see :mod:`jitkernels.noise`); the seed is
    saved with the state (which before finalize holds the un-noised aggregate anyway): protect state files; the
    privacy budget (epsilon, delta) is for an accountant such as Opacus' ``RDPAccountant``.
    """

    name = "dp_fixed"

    def __init__(self, algorithm=None, *, clip_norm: float, noise_multiplier: float, num_sampled: int | None = None,
                 seed: int | None = None):
        super().__init__(FedAvg(weighted=False) if algorithm is None else algorithm,
                         noise_multiplier=noise_multiplier, num_sampled=num_sampled, seed=seed)
        if not (math.isfinite(number("clip_norm", clip_norm)) and clip_norm > 0):
            raise ValueError(f"clip_norm must be finite and > 0, got {clip_norm!r}")
        self.fixed_clip_norm = float(clip_norm)

    def clip_norm(self, state) -> float:
        return self.fixed_clip_norm

    def params(self) -> dict:
        return {"name": self.name, "clip_norm": self.fixed_clip_norm, **self._params()}


COUNT_LEAF = 0xFFFFFFFF
_LOG_CLIP_MIN, _LOG_CLIP_MAX = math.log(1e-300), math.log(1e300)  # the adaptive clip norm's range
"""The noise stream (leaf id) of adaptive clipping's noised count: no layout has 2^32 - 1 leaves."""


class DPAdaptiveClipping(_DPClipping):
    r"""Central DP with adaptive clipping (Andrew, Thakkar, McMahan & Ramaswamy, 2021, "Differentially Private
    Learning with Adaptive Clipping"): the clip norm tracks a target quantile :math:`\gamma` of the update norms.

    .. math::  b_j = [\lVert \Delta_j \rVert_2 \le C_t], \quad
               \tilde b = \frac{\sum_j b_j + \mathcal{N}(0, \sigma_b^2)}{m}, \quad
               C_{t+1} = C_t \exp\big(-\eta_C (\tilde b - \gamma)\big)

    Updates are clipped to :math:`C_t` and the average delta noised with std :math:`\sigma_\Delta C_t / \min(m, k)`
    (:math:`k` the parties folded, as in :class:`DPFixedClipping`), where
    :math:`\sigma_\Delta = (\sigma^{-2} - (2\sigma_b)^{-2})^{-1/2}` keeps the total privacy cost that of noise
    multiplier :math:`\sigma` (their Theorem 1); :math:`\sigma_b` defaults to :math:`m / 20` (to 0 with :math:`\sigma = 0`, as Flower's). :math:`C` is saved with
    the state. Differences from Flower's ``DifferentialPrivacyServerSideAdaptiveClipping``, deliberate (tested):
    Flower counts *clipped* updates as :math:`b_j` in the same update rule, which drives :math:`C` the wrong way
    (more clipping shrinks :math:`C` further), and it noises the round's aggregate with the *updated*
    :math:`C_{t+1}` although the updates were clipped to :math:`C_t` (under-noising when :math:`C` shrinks). The
    count's noise is Philox-keyed like the model's, by the count it noises (leaf id
    :data:`COUNT_LEAF`). Bytes moved: those of
    :class:`DPFixedClipping` (the stats pass for the norms, then the scaled fold); the count is k numbers.
    """

    name = "dp_adaptive"

    def __init__(self, algorithm=None, *, noise_multiplier: float, num_sampled: int,
                 initial_clip_norm: float = 0.1, target_quantile: float = 0.5, clip_norm_lr: float = 0.2,
                 count_stddev: float | None = None, seed: int | None = None):
        if num_sampled is None:  # the clipped count's denominator
            raise ValueError("num_sampled (the parties sampled per round) is required for adaptive clipping")
        super().__init__(FedAvg(weighted=False) if algorithm is None else algorithm,
                         noise_multiplier=noise_multiplier, num_sampled=num_sampled, seed=seed)
        if not (math.isfinite(number("initial_clip_norm", initial_clip_norm)) and initial_clip_norm > 0):
            raise ValueError(f"initial_clip_norm must be finite and > 0, got {initial_clip_norm!r}")
        if not 0 <= number("target_quantile", target_quantile) <= 1:
            raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile!r}")
        if not (math.isfinite(number("clip_norm_lr", clip_norm_lr)) and clip_norm_lr > 0):
            raise ValueError(f"clip_norm_lr must be finite and > 0, got {clip_norm_lr!r}")
        self.initial_clip_norm, self.target_quantile = float(initial_clip_norm), float(target_quantile)
        self.clip_norm_lr = float(clip_norm_lr)
        # (as Flower's: no count noise where there is no noise, so that noise_multiplier=0 runs are deterministic)
        self.count_stddev = ((num_sampled / 20 if noise_multiplier > 0 else 0.0) if count_stddev is None
                             else number("count_stddev", count_stddev))
        if not (math.isfinite(self.count_stddev) and self.count_stddev >= 0):
            raise ValueError(f"count_stddev must be finite and >= 0, got {count_stddev!r}")
        if self.noise_multiplier > 0:
            if not self.noise_multiplier < 2 * self.count_stddev:
                given = "" if count_stddev is not None else ", the default num_sampled / 20: pass count_stddev="
                raise ValueError(f"noise_multiplier {noise_multiplier} needs count_stddev > {noise_multiplier / 2} "
                                 f"(got {self.count_stddev}{given})")
            self.delta_multiplier = (self.noise_multiplier ** -2 - (2 * self.count_stddev) ** -2) ** -0.5
        else:
            self.delta_multiplier = 0.0

    def clip_norm(self, state) -> float:
        return state.scalars["clip_norm"]

    def initial_scalars(self) -> dict:
        return {**self.inner.initial_scalars(), "clip_norm": self.initial_clip_norm}

    def derived_info(self, u, state) -> dict:
        return {**self.inner.derived_info(u, state), "unclipped": float(u.norm <= self.clip_norm(state))}

    def check_scalars(self, scalars: dict) -> None:
        """A saved state's clip norm is one this rule could have reached (ValueError else): its start, or within
        the range ``close`` keeps it in (a forged 1e308 turned clipping off unseen; 0 or less refused every party)."""
        c = scalars["clip_norm"]
        if not (c == self.initial_clip_norm or math.exp(_LOG_CLIP_MIN) <= c <= math.exp(_LOG_CLIP_MAX)):
            raise ValueError(f"server value 'clip_norm' = {c!r} is neither the initial clip norm "
                             f"({self.initial_clip_norm!r}) nor within [1e-300, 1e300]")

    def check_record(self, record, party) -> None:
        self.inner.check_record(record, party)
        if record.get("unclipped") not in (0.0, 1.0):  # (what derived_info records: the noised count sums them)
            raise InvalidUpdateInfo(party, "unclipped", record.get("unclipped"), "must be 0 or 1 in a saved state")

    def noise_std(self, state) -> float:
        return self.delta_multiplier * self.clip_norm(state) / self.cohort(state)

    def close(self, state) -> None:
        from .noise import aggregate_key, gaussian

        unclipped = math.fsum(state.info[p]["unclipped"] for p in state.parties)
        c = self.clip_norm(state)
        # keyed by the count and everything that turns it into the next clip norm, as the model's noise is by its
        # aggregate: two rounds released with one z would give away the difference of their counts
        key = aggregate_key(self.seed, state.round, [np.array([unclipped, self.count_stddev, self.num_sampled, c,
                                                               self.clip_norm_lr, self.target_quantile])])
        z = float(gaussian(key, state.round, COUNT_LEAF, 0, 1)[0])
        frac = (unclipped + self.count_stddev * z) / self.num_sampled
        # in log space, kept within float64's normal range: a count noise far above num_sampled overflowed exp()
        log_c = math.log(c) - self.clip_norm_lr * (frac - self.target_quantile)
        state.scalars["clip_norm"] = math.exp(min(max(log_c, _LOG_CLIP_MIN), _LOG_CLIP_MAX))
        self.inner.close(state)

    def params(self) -> dict:
        return {"name": self.name, "initial_clip_norm": self.initial_clip_norm,
                "target_quantile": self.target_quantile, "clip_norm_lr": self.clip_norm_lr,
                "count_stddev": self.count_stddev, **self._params()}


_CLASSES = {c.name: c for c in (FedAvg, FedProx, FedNova, FedBuff, SCAFFOLD, FedAvgM, FedAdam, FedYogi, FedAdagrad,
                                 DPFixedClipping, DPAdaptiveClipping)}
_BY_NAME = {
    "fedavg": lambda: FedAvg(),
    "fedavg_unweighted": lambda: FedAvg(weighted=False),
    "fednova": lambda: FedNova(),
    "fedbuff": lambda: FedBuff(),
    "fedavgm": lambda: FedAvgM(),
    "fedadam": lambda: FedAdam(),
    "fedyogi": lambda: FedYogi(),
    "fedadagrad": lambda: FedAdagrad(),
}


def resolve(algorithm):
    """An algorithm object from a name or an instance."""
    if isinstance(algorithm, str):
        make = _BY_NAME.get(algorithm.lower())
        if make is None:
            from . import robust

            make = {c.name: c for c in robust.CLASSES if c.name in robust.BY_NAME}.get(algorithm.lower())
        if make is None:
            raise ValueError(f"unknown algorithm {algorithm!r}; choose from {', '.join(_BY_NAME)}, fedmedian, "
                             f"fedtrimmedavg (or an instance)")
        return make()
    if isinstance(algorithm, type):  # (the class's methods were called unbound: "params() missing 'self'")
        raise TypeError(f"algorithm {algorithm.__name__} is a class; pass an instance, {algorithm.__name__}(...), or "
                        f"a name")
    for hook in ("fold_weight", "mass", "divisor_scale", "check_info", "derived_info", "noise_std", "close",
                 "params"):
        if not hasattr(algorithm, hook):
            raise TypeError(f"{algorithm!r} is not an algorithm (needs {hook}())")
    return algorithm


def from_params(params: dict):
    """Rebuild an algorithm from the ``params()`` saved in a state."""
    if not isinstance(params, dict):  # (a wrapper's inner record from a file: its checksum vouches for nothing)
        raise ValueError(f"an algorithm record is a dict of parameters, got {type(params).__name__}")
    p = {k: v for k, v in params.items() if k not in ("name", "int_leaves", "deterministic")}
    cls = _CLASSES.get(params.get("name"))
    if cls is None:
        from . import robust  # robust rules build on this module: looked up on demand

        cls = {c.name: c for c in robust.CLASSES}.get(params.get("name"))
    if cls is None:
        raise ValueError(f"unknown algorithm in state: {params.get('name')!r}")
    if "algorithm" in p:  # a wrapper: rebuild the inner algorithm first
        p["algorithm"] = from_params(p["algorithm"])
    return cls(**p)

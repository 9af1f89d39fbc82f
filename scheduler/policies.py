"""When to deploy an aggregator for a round: eager, lazy, jit, oracle.

Each policy answers one question, ``deploy_at(sched, job, round)``: the time at which the job's aggregator should be
deployed (start-up included) for its open round, or ``None`` for "not yet known; ask again on the next arrival". The
scheduler does everything else (slots, folding, release, metrics) the same way for all of them.
"""

from __future__ import annotations

import math

from jitkernels.algorithms import number


class Policy:
    name = "policy"
    keep_between_rounds = False  # eager keeps its deployment for the job's whole life
    fold_on_arrival = True  # once deployed, fold updates as they come (in batches of what is pending)

    def deploy_at(self, sched, js, rnd, *, redeploy: bool = False):
        """(time to deploy, inputs used), or (None, inputs) for 'not yet known'. ``redeploy``: for a deployed job,
        the latest start if its slot were taken back now (start-up included): what preemption weighs."""
        raise NotImplementedError

    def redeploy_after(self, sched, js, rnd, t: float) -> float | None:
        """``deploy_at(..., redeploy=True)``'s time ('not yet known': inf) where it is later than ``t``, else None:
        the search for a slot to take back needs the time only of the idle deployments that can wait past t (a
        policy may tell the others more cheaply)."""
        d, _ = self.deploy_at(sched, js, rnd, redeploy=True)
        d = math.inf if d is None else d
        return d if d > t else None

    def __repr__(self):
        return f"{type(self).__name__}()"


class Eager(Policy):
    """Today's platforms: deployed from the job's start to its end, folding each update on arrival."""

    name = "eager"
    keep_between_rounds = True

    def deploy_at(self, sched, js, rnd, *, redeploy=False):
        return sched.clock.now(), {}


class Lazy(Policy):
    """Deploy when the quorum is in and fold everything then: the resource floor and the latency ceiling."""

    name = "lazy"

    def deploy_at(self, sched, js, rnd, *, redeploy=False):
        return (rnd.quorum_time, {}) if rnd.quorum_time is not None else (None, {"waiting": "quorum"})


class JIT(Policy):
    """Deploy at the latest start that meets the quorum time's alpha-quantile:

        deploy_at = round_start + min(Q_alpha(T_q), deadline) - work(remaining updates + finalize) - startup (if not
                deployed)

(the deadline where the job's rounds end with what came by then, ``unreachable="partial"``)

    then fold the buffered updates in one fused batch and the rest as they come. alpha is the accepted risk that the
    quorum arrives before the aggregator is ready (then the round waits for the start-up and the backlog). Before
    any response has been seen (and with no prior) it deploys at once, as eager would: no prediction is possible.
    """

    name = "jit"

    def __init__(self, alpha: float = 0.05):
        if not 0 < number("alpha", alpha) < 1:  # (None and "x" failed as bare TypeErrors)
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.alpha = alpha

    def deploy_at(self, sched, js, rnd, *, redeploy=False):
        now = sched.clock.now()
        if rnd.quorum_time is not None:
            return now, {"quorum": "reached"}
        need = rnd.quorum - len(rnd.members)
        q = js.predictor.quorum_quantile(js.pending(rnd), need, now - rnd.start, self.alpha, near=rnd.quantile_s)
        rnd.quantile_s = q  # (the next plan's search starts there: the same answer, found in fewer steps)
        if math.isinf(q) and not js.predictor.has_history():  # cold start: nothing to predict from, so behave like
            return now, {"quantile": "unknown (no history yet)", "need": need}  # eager
        if js.job.deadline_s is not None and js.job.unreachable == "partial":
            # the round ends at its deadline with what came if the quorum has not: it is ready by then (planned on
            # the quorum alone it deployed after the deadline, and every such round paid a whole start-up late)
            q = min(q, js.job.deadline_s)
        if math.isinf(q):
            return None, {"quantile": "inf", "need": need}
        work = sched.work_estimate(js, rnd)
        startup = 0.0 if js.deployment is not None and not redeploy else sched.cost.startup_s
        t = rnd.start + q - work - startup
        return t, {"quantile_s": round(q, 6), "work_s": round(work, 6), "startup_s": startup, "alpha": self.alpha}

    def redeploy_after(self, sched, js, rnd, t: float) -> float | None:
        """The redeployment is later than ``t`` where the quorum time's quantile is later than t - round start +
        work + start-up: one evaluation of the quorum CDF tells (the quantile's search takes 10-15), and only a
        deployment that can wait is planned in full. A slot search asks this of up to SEARCH_MAX idle deployments,
        and planned them all: on 200 slots that was a third of the first round's time, for no victim."""
        if rnd.quorum_time is None and js.predictor.has_history():
            x = t - rnd.start + sched.work_estimate(js, rnd) + sched.cost.startup_s
            if js.job.deadline_s is not None and js.job.unreachable == "partial" and js.job.deadline_s <= x:
                return None
            if not js.predictor.quantile_after(js.pending(rnd), rnd.quorum - len(rnd.members),
                                               sched.clock.now() - rnd.start, self.alpha, x):
                return None
        return super().redeploy_after(sched, js, rnd, t)

    def __repr__(self):
        return f"JIT(alpha={self.alpha})"


class Oracle(Policy):
    """Knows the true time a round's membership is fixed (from the simulator: its quorum, or its deadline where that
    comes first): a bound no online policy can beat."""

    name = "oracle"

    def __init__(self, quorum_time_fn):
        self.quorum_time_fn = quorum_time_fn  # (job_id, round) -> absolute time of the q-th arrival

    def deploy_at(self, sched, js, rnd, *, redeploy=False):
        if rnd.quorum_time is not None:  # (a deadline's partial rule ended the round early: no drawn quorum says when)
            return sched.clock.now(), {"quorum": "reached"}
        t_q = self.quorum_time_fn(js.job.id, rnd.number)
        if t_q is None:
            return None, {"oracle": "no quorum"}
        work = sched.work_estimate(js, rnd)
        startup = 0.0 if js.deployment is not None and not redeploy else sched.cost.startup_s
        return t_q - work - startup, {"true_quorum": t_q, "work_s": work, "startup_s": startup}


def make(policy, *, alpha: float = 0.05, oracle=None) -> Policy:
    if isinstance(policy, Policy):
        return policy
    if policy == "eager":
        return Eager()
    if policy == "lazy":
        return Lazy()
    if policy == "jit":
        return JIT(alpha)
    if policy == "oracle":
        if oracle is None:
            raise ValueError("the oracle policy needs oracle=(job_id, round) -> true quorum time")
        return Oracle(oracle)
    raise ValueError(f"unknown policy {policy!r}; choose eager, lazy, jit or oracle")

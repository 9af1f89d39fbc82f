"""Deadline-aware just-in-time scheduling of FL aggregation (see ../shared DESIGN: "Scheduler").

>>> from scheduler import JITScheduler, Job
>>> sched = JITScheduler(policy="jit", slots=2)                       # doctest: +SKIP
>>> sched.add_job(Job("job-a", template=model, parties=ids, quorum=0.8))  # doctest: +SKIP
>>> ack = sched.submit("job-a", round=0, party="p17", update=upd, weight=512)  # doctest: +SKIP
>>> model = sched.result("job-a", round=0).result()                   # doctest: +SKIP
"""

from .clock import RealClock, VirtualClock
from .core import (Ack, Backpressure, InvalidJob, Job, JITScheduler, JobRemoved, LateUpdate, NoSuchRound,
                   QuorumUnreachable, RoundForgotten, SchedulerClosed, SchedulerError, UnknownJob, UnknownParty)
from .cost import BackendCost, CostModel
from .durable import Crashed, StateDir, StateDirLocked
from .executors import LocalExecutor, MeasuredExecutor, ModelExecutor, RayExecutor, Task
from .policies import JIT, Eager, Lazy, Oracle, Policy
from .predictor import Predictor, poisson_binomial_tail

__all__ = ["Ack", "Backpressure", "BackendCost", "CostModel", "Crashed", "Eager", "InvalidJob", "JIT", "JITScheduler",
           "Job", "JobRemoved", "LateUpdate", "Lazy", "LocalExecutor", "MeasuredExecutor", "ModelExecutor",
           "NoSuchRound", "Oracle", "Policy", "Predictor", "QuorumUnreachable", "RayExecutor", "RealClock",
           "RoundForgotten", "SchedulerClosed", "SchedulerError", "StateDir", "StateDirLocked", "Task", "UnknownJob",
           "UnknownParty", "VirtualClock", "poisson_binomial_tail"]

"""Typed errors. Every rejection names what is wrong (leaf, party, value) and leaves state untouched."""

from __future__ import annotations


class AggregationError(Exception):
    """Base class of every error jitkernels raises on bad input or state."""

    def __reduce__(self):
        # pickled with its fields, not rebuilt by calling the class with its message (what Exception does, which
        # most of these classes' __init__ does not take): a Ray task's error reaches the driver pickled, and came as
        # Ray's UnserializableException, no AggregationError, or with .party set to the whole message
        return _rebuilt, (type(self), self.args), self.__dict__


def _rebuilt(cls, args):
    """An error of ``cls`` made from ``args`` by its built-in base's __new__ and __init__ (an OSError's parse errno
    and strerror from them), not its own __init__; pickle then restores its fields and notes from __dict__."""
    builtin = next(c for c in cls.__mro__ if c.__module__ == "builtins")
    try:
        e = cls.__new__(cls, *args)
    except TypeError:  # (MemoryError's __new__ refuses a subclass whose layout comes from another base)
        e = BaseException.__new__(cls, *args)
    builtin.__init__(e, *args)
    return e


class LayoutMismatch(AggregationError, ValueError):
    """An update's leaves differ from the job's layout (name, shape, dtype or container)."""

    def __init__(self, message: str, *, leaf: str | None = None, party=None):
        self.leaf = leaf
        self.party = party
        where = []
        if party is not None:
            where.append(f"party {party!r}")
        if leaf is not None:
            where.append(f"leaf {leaf!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class InvalidQuantized(LayoutMismatch, TypeError):
    """A ``Quantized`` leaf whose values are not int8 or whose scales do not match its values and block (built from a
    party's bytes, it is that party's bad update; a TypeError too, as it was before it had a type of its own)."""


class InvalidTemplate(AggregationError, TypeError):
    """A template that cannot describe a model: no array leaves, a leaf dtype that is not float, integer or bool, a
    key that is not a str, two leaves of one name, or containers nested past the limit."""


class NonFiniteUpdate(AggregationError, ValueError):
    """An update holds NaN or inf (found by the admission stats pass)."""

    def __init__(self, party, leaf: str, count: int, *, index: int | None = None, value: float | None = None):
        self.party, self.leaf, self.count, self.index, self.value = party, leaf, count, index, value
        first = "" if index is None else f", the first ({value}) at flat index {index}"
        super().__init__(f"party {party!r}: leaf {leaf!r} holds {count} non-finite value(s){first}")


class ValueOutOfRange(AggregationError, ValueError):
    """An update's magnitude, or a weight, exceeds what the accumulator (or deterministic grid) can hold. ``party``,
    ``leaf`` and ``value`` name what is out of range where one party, leaf or value is (None where the limit is the
    round's: a state's capacity, a leaf's total weight)."""

    def __init__(self, message: str, *, party=None, leaf: str | None = None, value=None):
        self.party, self.leaf, self.value = party, leaf, value
        super().__init__(message)


class InvalidWeight(AggregationError, ValueError):
    """A weight that is not a number, or <= 0, NaN or inf."""

    def __init__(self, party, weight):
        self.party, self.weight = party, weight
        super().__init__(f"party {party!r}: weight {shown(weight)} must be a finite number > 0")


def shown(value, limit: int = 40) -> str:
    """``repr(value)`` as an error message shows it: at most ``limit`` characters (10**400 has 401 digits)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class InvalidUpdateInfo(AggregationError, ValueError):
    """A per-update value an algorithm reads (``steps``, ``staleness``) is missing, unused or out of range."""

    def __init__(self, party, key: str, value, problem: str):
        self.party, self.key, self.value = party, key, value
        shown = "" if value is None else f" = {value!r}"
        super().__init__(f"party {party!r}: {key}{shown} {problem}")


class TooFewUpdates(AggregationError, ValueError):
    """A robust rule was asked to tolerate f Byzantine parties with fewer updates than its guarantee requires."""

    def __init__(self, rule: str, k: int, f: int, need: int):
        self.rule, self.k, self.f, self.need = rule, k, f, need
        super().__init__(f"{rule} with f={f} needs at least {need} updates, got {k}")


class RoundClosed(AggregationError, RuntimeError):
    """A server optimizer's round was finalized (its step applied): reset() before folding into the next one."""


class TornState(AggregationError, RuntimeError):
    """A fold, merge or closing finalize failed part-way (out of memory on the GPU between two groups, an interrupt):
    the state holds part of it (a batch's leaves without its parties, DP noise, leaves stepped), so doing it again
    would count that part twice. The state refuses folds, merges, finalize and saves until reset() (a server step
    stopped part-way refuses reset too); restore the last saved state, or fold the round again."""


class InvalidParty(AggregationError, TypeError):
    """A party id that is not a str or an int (ids go into state files as JSON)."""


class DuplicateParty(AggregationError, ValueError):
    """A party would be folded twice into one state (or appears twice in one batch)."""

    def __init__(self, party, where: str = "this state"):
        self.party = party
        super().__init__(f"party {party!r} is already folded into {where}")


class OverlappingParties(AggregationError, ValueError):
    """Two partial states to merge share parties: merging would count them twice."""

    def __init__(self, parties):
        self.parties = sorted(map(str, parties))
        shown = ", ".join(repr(p) for p in self.parties[:5])
        more = f" and {len(self.parties) - 5} more" if len(self.parties) > 5 else ""
        super().__init__(f"states share parties {shown}{more}")


class IncompatibleStates(AggregationError, ValueError):
    """States with different layouts, algorithms or accumulator dtypes cannot be merged."""


class CorruptState(AggregationError, OSError):
    """A saved state file is truncated, altered, or of an unknown format version."""


class BackendUnavailable(AggregationError, RuntimeError):
    """The backend named explicitly is not installed here, or cannot run this dtype."""


class EmptyAggregate(AggregationError, ValueError):
    """Finalize was called on a state into which nothing (or nothing for some leaf) was folded."""

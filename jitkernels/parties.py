"""Party ids: what one may be (a str or an int: ids go into state files as JSON), and one for an update sent
without an id."""

from __future__ import annotations

import decimal
import numbers
import sys
import uuid

import numpy as np

from .dtypes import is_float_name
from .errors import InvalidParty

MAX_ID_CHARS = 1 << 16
"""The longest str id (an int id is a 64-bit one, signed or not: Flower's node ids are random uint64s): a 100 MB id
was folded and then failed every save (safetensors' header limit), an int of 5,000 digits every message and save
that printed it (Python's int-to-str limit)."""


def check_party(p):
    """``p`` as a party id (a numpy integer as an int), or :class:`InvalidParty`."""
    if type(p) is str or type(p) is int:  # (the usual ids; the ABC check below costs 0.4 us, once per update)
        q = p
    elif isinstance(p, str) or (isinstance(p, numbers.Integral) and not isinstance(p, bool)):
        q = str(p) if isinstance(p, str) else int(p)
    else:
        raise InvalidParty(f"party ids must be str or int, got {type(p).__name__} {p!r}")
    if (len(q) > MAX_ID_CHARS) if type(q) is str else not (-(1 << 63) <= q < (1 << 64)):
        what = (f"{len(q):,} characters" if type(q) is str else  # (repr refuses ints past 4,300 digits)
                f"{q if q.bit_length() <= 128 else f'an int of {q.bit_length()} bits'}, outside [-2^63, 2^64)")
        raise InvalidParty(f"party ids are str of at most {MAX_ID_CHARS:,} characters or 64-bit ints; got {what}")
    return q


def real_value(x) -> float | None:
    """The float of a real number a party sent, else None: an int, a float, a Fraction or a Decimal, a numpy scalar
    or one-element array, or a one-element torch tensor, of an integer or float dtype (bfloat16 too). Not a bool, a
    complex (float() dropped its imaginary part), a str or bytes (float() read "2" as 2.0), nor an array of them;
    None also where float() overflows (10**400) or fails."""
    if type(x) is float:  # (the usual weight: the ABC checks below cost a submit ~1 us)
        return x
    if isinstance(x, (bool, np.bool_)):
        return None
    if isinstance(x, (np.ndarray, np.generic)):  # (before numbers.Real: a timedelta64 is a numpy integer, and passed
        # as its count of units)
        if not (x.size == 1 and (x.dtype.kind in "iuf" or is_float_name(x.dtype.name))):  # (bfloat16: kind V)
            return None
        x = x.reshape(-1)[0] if isinstance(x, np.ndarray) else x
    elif not isinstance(x, (numbers.Real, decimal.Decimal)):
        torch = sys.modules.get("torch")
        if not (torch is not None and isinstance(x, torch.Tensor) and x.numel() == 1 and not x.dtype.is_complex
                and x.dtype != torch.bool):
            return None
    try:
        return float(x)
    except (TypeError, ValueError, OverflowError, RuntimeError, decimal.InvalidOperation):
        return None


def anonymous_party() -> str:
    """A party id for an update given without one: unique across aggregators and processes (a per-aggregator
    counter made two workers' "anon-0" collide when their states were merged)."""
    return f"anon-{uuid.uuid4().hex}"


def per_update(values, k: int, what: str) -> list:
    """``values`` as a list of k (None: k Nones); a list of another length is refused, not cut short by zip."""
    if values is None:
        return [None] * k
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):  # ('ab' became parties a, b)
        raise TypeError(f"{what} is a list, one per update; got {type(values).__name__}")
    values = list(values)
    if len(values) != k:
        raise ValueError(f"{k} updates but {len(values)} {what}")
    return values

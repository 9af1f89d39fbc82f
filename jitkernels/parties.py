"""Party ids: what one may be (a str or an int: ids go into state files as JSON), and one for an update sent
without an id."""

from __future__ import annotations

import numbers
import uuid

from .errors import InvalidParty


def check_party(p):
    """``p`` as a party id (a numpy integer as an int), or :class:`InvalidParty`."""
    if type(p) is str or type(p) is int:  # (the usual ids; the ABC check below costs 0.4 us, once per update)
        return p
    if isinstance(p, str) or (isinstance(p, numbers.Integral) and not isinstance(p, bool)):
        return str(p) if isinstance(p, str) else int(p)
    raise InvalidParty(f"party ids must be str or int, got {type(p).__name__} {p!r}")


def anonymous_party() -> str:
    """A party id for an update given without one: unique across aggregators and processes (a per-aggregator
    counter made two workers' "anon-0" collide when their states were merged)."""
    return f"anon-{uuid.uuid4().hex}"

"""Progress bars for the long-running commands: tqdm's (on stderr) when it is installed and wanted, else a bar that
does nothing, so that ``progress=False`` runs need no tqdm."""

from __future__ import annotations

import sys


class _Quiet:
    """tqdm's interface, minus the output."""

    def __init__(self, iterable=None, total=None):
        self.iterable, self.total, self.n = iterable, total, 0

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description(self, *args, **kwargs) -> None:
        pass

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def bar(iterable=None, *, total=None, enabled: bool = True, **kwargs):
    """``tqdm(iterable, total=total, file=sys.stderr, **kwargs)``, or a silent stand-in when ``enabled`` is false or
    tqdm is not installed (it comes with the ``bench`` and ``test`` extras)."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(iterable, total=total, file=sys.stderr, **kwargs)
    return _Quiet(iterable, total)

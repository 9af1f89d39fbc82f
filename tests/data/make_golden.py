"""Writes the golden state files of the CURRENT format version (run once per new version; never overwrite old ones).

Inputs are fixed (no randomness) so that tests/test_state.py can recompute what each file must finalize to.
"""

import os
import sys

import numpy as np

import jitkernels as jk
from jitkernels.state import VERSION

HERE = os.path.dirname(os.path.abspath(__file__))


def golden_inputs():
    tmpl = {"enc": {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float16)},
            "head": np.zeros(5, np.float32), "steps": np.array(0, np.int64)}
    ups = []
    for j in range(3):
        ups.append({"enc": {"w": (np.arange(12, dtype=np.float32).reshape(3, 4) * (j + 1)),
                            "b": np.full(4, 0.5 * (j + 1), np.float16)},
                    "head": np.linspace(-1, 1, 5).astype(np.float32) * (j + 1), "steps": np.array(10 * (j + 1))})
    return tmpl, ups, [1.0, 2.0, 3.0]


def main():
    tmpl, ups, ws = golden_inputs()
    for acc in ("float32", "float64") if VERSION <= 2 else ():  # version 3 writes plain states as version 2
        path = os.path.join(HERE, f"foldstate_v{VERSION}_{acc}.jks")
        if os.path.exists(path) and "--force" not in sys.argv:
            print("exists, keeping:", path)
            continue
        agg = jk.Aggregator(tmpl, acc_dtype=acc, backend="numpy")
        agg.fold_many(ups, ws, parties=["alice", "bob", 7])
        agg.state.save(path)
        print("wrote", path)
    if VERSION >= 3:  # the absent-leaf record of deterministic partial states
        path = os.path.join(HERE, f"foldstate_v{VERSION}_deterministic_partial.jks")
        if not os.path.exists(path) or "--force" in sys.argv:
            agg = jk.Aggregator(tmpl, deterministic=True, partial=True, backend="numpy")
            agg.fold_many([without_head(u) if j == 1 else u for j, u in enumerate(ups)], ws,
                          parties=["alice", "bob", 7])
            agg.state.save(path)
            print("wrote", path)


def without_head(update):
    """bob's update in the deterministic partial golden file: it lacks the "head" leaf."""
    return {k: v for k, v in update.items() if k != "head"}


if __name__ == "__main__":
    main()

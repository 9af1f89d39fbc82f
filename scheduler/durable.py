"""Crash safety: a state directory that holds every acknowledged update and every committed partial aggregate, from
which a new scheduler resumes (``JITScheduler(state_dir=...)``, then ``add_job`` as before, or
``JITScheduler.recover``) with no acknowledged update lost and none counted twice.

Layout of the directory::

    LOCK                                   flock'ed by the one scheduler that owns the directory
    updates/<job>/<round>/<party>.jku      one acknowledged update, until a committed generation covers it
    states/<job>-r<round>-g<gen>.jks       a round's partial aggregate (a FoldState file) as of generation <gen>
    states/<job>-carry-r<round>.jks        what a finished round hands the next one (a closed FoldState: the
                                           server optimizer's model and moments, the round counter, DP scalars)
    results/<job>-r<round>.jkr             a finished round's model
    manifest-<gen>.json                    generation <gen>: per job, its open round, that round's state file and
                                           folded parties, the carry, and its finished rounds' result files

Every file is written by ``jitkernels.atomic_write`` (temp file with O_EXCL -> fsync -> rename -> fsync the
directory) and carries a SHA-256 checksum; nothing is ever unpickled. A generation's manifest is written after the
files it names, so its rename is the commit point: a crash before it leaves the previous generation in force, and
the updates that the new one would have covered are still on disk. Opening the directory verifies the newest
manifest and every file it names, and falls back to the previous generation if any check fails; orphan temp files
are removed. Files are deleted only once the *older* of the two retained generations covers them, so that the
fallback never misses an update.

A removed job (``JITScheduler.remove_job``) has a tombstone entry, ``{"removed": true}``, in two generations; its
files are deleted then (the updates' folder at once, or at the next open after a crash), and the next generation
drops the tombstone.

A round's result and its carry commit together (one generation names both): a server-optimizer step (FedAdam, say)
or a round's DP noise applied twice would not be idempotent, and the next round must start from exactly that state.
Where the generation in force names a round as open though the directory holds its result (a fallback passed over
the damaged generation that had finished it, or a crash came between the result's file and its manifest), a resume
serves that file, if it verifies and matches what the directory holds of the round, instead of folding the round
again (``StateDir.unnamed_result``, ``JITScheduler._resume``): outside deterministic mode the fold's sums may differ
in their last bits, and a DP round was released twice, with other noise. So such a file and its carry are not
collected until the job's resume has served them or let them go. A job that starts afresh (new to the directory, or
added again after its removal) records a random incarnation in its entry, and its result files record it too: a file
that a removed run under the same id left (a failed collection kept it) is not served to the run after it.

Names in paths are the hex of the JSON of job ids and party ids (any str or int is a safe file name that way, up
to MAX_JOB_ID_BYTES / MAX_PARTY_ID_BYTES of JSON: a job new to the directory with a longer id, or any job with a
longer party id, is refused when it is added, not when a file name turns out too long).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import jitkernels as jk
from jitkernels.device import to_host
from jitkernels.dtypes import dtype_name
from jitkernels.state import checked_writer, is_temp_file, read_checked

from .executors import check_nice, renice
from .predictor import model_row_error

log = logging.getLogger("jitkernels.scheduler")

MANIFEST_FORMAT = "jitkernels.scheduler-state"
VERSION = 1
UPDATE_FORMAT = "jitkernels.update"
RESULT_FORMAT = "jitkernels.round-result"
_NAME_ROOM = 255 - len(".." + "x" * 8 + ".tmp")  # a file name's 255 bytes, less atomic_write's temp-name additions
MAX_JOB_ID_BYTES = (_NAME_ROOM - len("-r-g.jks") - 24) // 2  # its hex names state files (<job>-r<round>-g<gen>.jks)
MAX_PARTY_ID_BYTES = (_NAME_ROOM - len(".jku")) // 2  # its hex names update files (<party>.jku)
"""The longest job and party ids (as JSON) a state directory takes (104 and 118 bytes): their hex names files, which
must stay within the 255 bytes a file name may have (rounds and generations up to 12 digits)."""
_MANIFEST = re.compile(r"manifest-(\d+)\.json")


class StateDirLocked(jk.AggregationError, RuntimeError):
    """Another scheduler holds the state directory."""


class Crashed(RuntimeError):
    """The state directory stopped at a crash point (tests): nothing more reaches the disk."""


def ident(x) -> str:
    """A file name for a job or party id (reversible: hex of its JSON)."""
    return json.dumps(x).encode().hex()


def _check_id(x, what: str, limit: int) -> None:
    n = len(json.dumps(x).encode())
    if n > limit:
        raise ValueError(f"{what} {x!r:.60} is {n} bytes as JSON; a state directory takes such ids of at most "
                         f"{limit} bytes (they name its files)")


def unident(name: str):
    return json.loads(bytes.fromhex(name).decode())


def _result_rel(job, rnd: int) -> str:
    return os.path.join("results", f"{ident(job)}-r{int(rnd)}.jkr")


def _carry_rel(job, rnd: int) -> str:
    return os.path.join("states", f"{ident(job)}-carry-r{int(rnd)}.jks")


# --- file encodings ---------------------------------------------------------------------------------------------
def encode_leaves(leaves) -> tuple:
    """(tensors, dtypes) of flattened leaves: arrays as they are (bf16 as its uint16 bits), int8-quantized leaves as
    values + scales under the tag "q8" (block size kept in ``dtypes``; "int8" is a plain int8 leaf), device leaves
    copied to the host. Shapes are kept, 0-d ones too (np.ascontiguousarray makes them 1-d: a BatchNorm counter came
    back as shape (1,), and its update was refused when read back)."""
    tensors, dtypes = {}, {}
    for i, a in enumerate(leaves):
        if a is None:
            continue
        a = to_host(a)  # (a device leaf, or a quantized one's device values and scales)
        if isinstance(a, jk.Quantized):
            tensors[f"{i}.q"] = np.ascontiguousarray(a.values).reshape(np.shape(a.values))
            tensors[f"{i}.s"] = np.ascontiguousarray(a.scale).reshape(np.shape(a.scale))
            dtypes[str(i)] = [QUANTIZED, a.block]
            continue
        name = dtype_name(a.dtype)
        tensors[str(i)] = np.ascontiguousarray(a.view(np.uint16) if name == "bfloat16" else a).reshape(a.shape)
        dtypes[str(i)] = [name, None]
    return tensors, dtypes


QUANTIZED = "q8"  # an int8-quantized leaf's tag ("int8" in files written before 2026-11-27, told apart by its ".q")


def decode_leaves(tensors, dtypes, n_leaves, shapes=None) -> list:
    """The leaves :func:`encode_leaves` wrote; ValueError where the record does not describe the tensors (a file
    it did not write: a leaf index past the layout, an entry of another form, values of another dtype). ``shapes``:
    the layout's, to which leaves of the same size are reshaped (files written before 2026-11-27 hold 0-d leaves
    as shape (1,))."""
    def shaped(a, i):
        return a.reshape(shapes[i]) if shapes is not None and a.shape != shapes[i] and a.size == math.prod(
            shapes[i]) else a
    if not isinstance(dtypes, dict):
        raise ValueError(f"the leaves record is a {type(dtypes).__name__}, not a mapping")
    out = [None] * n_leaves
    for key, entry in dtypes.items():
        if not (_is_count(key) and int(key) < n_leaves and isinstance(entry, list) and len(entry) == 2):
            raise ValueError(f"leaf record {key!r}: {entry!r} (the layout has {n_leaves} leaves)")
        (name, block), i = entry, int(key)
        if name == QUANTIZED or name == "int8" and f"{key}.q" in tensors:
            q, scale = tensors[f"{key}.q"], tensors[f"{key}.s"]
            if q.dtype != np.int8:
                raise ValueError(f"leaf {i}: int8 values stored as {q.dtype}")
            out[i] = jk.Quantized(shaped(q, i), scale, block)
        else:
            a = tensors[key]
            if dtype_name(a.dtype) != ("uint16" if name == "bfloat16" else name):
                raise ValueError(f"leaf {i}: {name} values stored as {a.dtype}")
            out[i] = shaped(a.view(jk.bfloat16) if name == "bfloat16" else a, i)
    return out


def _check_entry(m) -> None:
    """A job's manifest entry as commits write it (a checksum anyone can compute vouches for nothing): a round
    number, state and carry files in states/, result files in results/ by round, failures as [type, message],
    parties as [id, update id] pairs (a failed round's too, by round: manifests written before they were kept lack
    them), a lowered quorum as [round, quorum] and the wall time the open round opened (optional too); a removed
    job's tombstone. A path elsewhere (/etc/passwd, a FIFO that hung the open) is refused."""
    def named(rel, folder, suffix):
        return (isinstance(rel, str) and os.path.dirname(rel) == folder and rel.endswith(suffix)
                and os.path.basename(rel) not in ("", ".", ".."))
    rounds = lambda d: isinstance(d, dict) and all(isinstance(k, str) and _is_count(k) for k in d)  # noqa: E731
    pairs = lambda x: isinstance(x, list) and all(isinstance(e, list) and len(e) == 2 for e in x)  # noqa: E731
    ok = (isinstance(m, dict) and (m.get("round") is None or type(m["round"]) is int and m["round"] >= 0)
          and all(m.get(k) is None or named(m[k], "states", ".jks") for k in ("state", "carry"))
          and rounds(m.get("results", {})) and all(named(v, "results", ".jkr") for v in m.get("results", {}).values())
          and rounds(m.get("failed", {})) and all(isinstance(v, list) and len(v) == 2 and all(
              isinstance(x, str) for x in v) for v in m.get("failed", {}).values())
          and pairs(m.get("parties", []))
          and rounds(m.get("failed_parties", {})) and all(pairs(v) for v in m.get("failed_parties", {}).values())
          and isinstance(m.get("carried", []), list) and all(
              isinstance(e, list) and len(e) == 2 and type(e[1]) is int for e in m.get("carried", []))
          and (m.get("quorum") is None or isinstance(m["quorum"], list) and len(m["quorum"]) == 2
               and all(type(x) is int for x in m["quorum"]) and m["quorum"][0] >= 0 and m["quorum"][1] >= 1)
          and isinstance(m.get("dropped", []), list) and isinstance(m.get("predictor") or [], list)
          and (m.get("opened") is None or type(m["opened"]) is float and math.isfinite(m["opened"]))
          and (m.get("incarnation") is None or isinstance(m["incarnation"], str)))
    # the arrival models, with values a model can hold (a NaN variance restored made every plan of the job NaN)
    row = next(filter(None, map(model_row_error, m.get("predictor") or [])), None) if ok else None
    ok = ok and row is None and (m.get("removed") is None or m == {"removed": True})  # (a removed job's tombstone)
    if not ok:
        raise jk.CorruptState(f"a job entry not as a commit writes it: {json.dumps(m)[:200]}"
                              + (f" (its arrival model of {row})" if row else ""))


def _is_count(name: str) -> bool:
    """A directory or key name that is a round or leaf number (str.isdigit takes '²', which int() refuses)."""
    return name.isascii() and name.isdecimal()


class StateDir:
    """The scheduler's state directory (see the module docstring). Thread-safe; updates are persisted by one writer
    thread, so that ``submit`` returns at once and its acknowledgement's ``durable`` future waits for the disk.

    ``crash_hook(point)`` (tests) is called at every step of the commit protocol, with points named
    ``<update|state|result|manifest>.<tmp_synced|renamed|dir_synced>`` and ``gc.<started|deleted>``; a hook that
    calls :meth:`die` and raises stops the directory there, as a crash would."""

    def __init__(self, path, *, crash_hook=None, keep_results: int | None = None, writer_nice: int = 0):
        writer_nice = check_nice(writer_nice, "writer_nice")
        self.path = os.path.abspath(os.fspath(path))
        self.keep_results = keep_results  # finished rounds' results a job's manifest names (None: all)
        os.makedirs(self.path, exist_ok=True)
        self._lockf = open(os.path.join(self.path, "LOCK"), "a+")
        self._close_lock = threading.Lock()
        try:
            fcntl.flock(self._lockf.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockf.close()
            raise StateDirLocked(f"{self.path} is used by another scheduler (LOCK is held)") from None
        self.crash_hook = crash_hook
        self.dead = False
        self.closed = False  # close() was called: nothing more is written (a stale reference must not)
        self._lock = threading.RLock()
        self._writer_thread = None  # (set as it starts: close() from it cannot wait for it)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="jitkernels-durable", initializer=self._start_writer,
                                          initargs=(writer_nice,))
        self.fallbacks: list = []  # (manifest, reason) skipped at open
        self._held: set = set()  # update files collection must keep (spilled updates not yet folded: hold/release)
        self._purged: set = set()  # removed jobs whose files are gone: the next commit drops their tombstones
        # its own lock, not the commits': submit holds a spilled update's file, and must not wait for a checkpoint's
        # write and fsync (46-82 ms at 16 MB)
        self._held_lock = threading.Lock()
        try:
            self.orphans_removed = self._collect_orphans()
            self.gen, self.jobs = self._load()
            self._unnamed = self._find_unnamed()
            for job, m in self.jobs.items():  # removed before a crash that came before their updates were deleted
                if m.get("removed"):
                    self._purge(job)
                    self._purged.add(job)
        except BaseException:  # (an unreadable directory, no memory): let the lock and the writer go, or the
            self._writer.shutdown(wait=False)  # directory stayed locked to every later scheduler in this process
            self._lockf.close()
            raise
        self.prev_jobs = self.jobs  # the older retained generation (what deletions wait for)

    # --- protocol steps -------------------------------------------------------------------------------------------
    def die(self) -> None:
        """Stop writing, as a killed process would."""
        self.dead = True

    def crash(self) -> None:
        """Die, and drop the lock as the kernel does for a dead process (tests: a new scheduler in the same
        process may then open the directory)."""
        self.die()
        self._lockf.close()

    def _step(self, point: str) -> None:
        if self.dead:
            raise Crashed(point)
        if self.closed and not point.startswith("gc."):
            raise RuntimeError(f"state directory {self.path} is closed; nothing more is written to it ({point})")
        if self.crash_hook is not None:
            self.crash_hook(point)

    def _write(self, kind: str, rel: str, data) -> None:  # bytes, or a writer (jitkernels.state.checked_writer)
        self._step(f"{kind}.begin")
        path = os.path.join(self.path, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        jk.atomic_write(path, data, on_step=lambda s: self._step(f"{kind}.{s}"))

    def _collect_orphans(self) -> int:
        n = 0
        for root, _, files in os.walk(self.path):
            for f in files:
                if is_temp_file(f):
                    os.unlink(os.path.join(root, f))
                    n += 1
        return n

    def check_ids(self, job, parties) -> None:
        """ValueError for a job id new to the directory, or any party id, that would name files over 255 bytes (see
        MAX_JOB_ID_BYTES); a job the directory holds files of keeps its id (they fitted). Parties are checked for
        every job: no longer id has a file anywhere (atomic_write's temporary name would pass 255 bytes), and one
        that joined a known job on a restart had every update acknowledged and none written."""
        if not (job in self.jobs or os.path.isdir(os.path.join(self.path, "updates", ident(job)))):
            _check_id(job, "job id", MAX_JOB_ID_BYTES)
        for p in parties:
            _check_id(p, f"job {job!r}: party id", MAX_PARTY_ID_BYTES)

    # --- updates --------------------------------------------------------------------------------------------------
    def _update_rel(self, job, rnd: int, party) -> str:
        return os.path.join("updates", ident(job), str(int(rnd)), ident(party) + ".jku")

    def persist_update(self, job, rnd: int, party, update_id, weight: float, leaves, fingerprint: str,
                       info=None, carried_from: int | None = None, live=None):
        """Write one acknowledged update (on the writer thread), with its per-update values (``info``) and, for a late
        update counted in ``rnd``, the round it was sent for (``carried_from``); returns the future that resolves once
        it is durable. ``live()`` false when the write comes: the job was removed meanwhile, and nothing is written
        (a job added again under its id must not find it)."""
        def work():
            if live is not None and not live():
                raise RuntimeError(f"job {job!r} was removed; its update from {party!r} for round {rnd} is not kept")
            tensors, dtypes = encode_leaves(leaves)
            meta = {"format": UPDATE_FORMAT, "version": str(VERSION), "job": json.dumps(job),
                    "round": str(int(rnd)), "party": json.dumps(party), "update_id": json.dumps(update_id),
                    "weight": repr(float(weight)), "layout": fingerprint, "leaves": json.dumps(dtypes),
                    "carried_from": json.dumps(None if carried_from is None else int(carried_from)),
                    "info": json.dumps(info or {})}
            # save_file, not save: building the bytes would hold the GIL (22 ms for 32 MB), and submit waits on it
            try:
                self._write("update", self._update_rel(job, rnd, party), checked_writer(tensors, meta))
            except FileNotFoundError:  # its round's folder collected under the write: a generation committed since
                with self._lock:  # covers the round (its result or failure), and the update with it
                    if int(rnd) < self.jobs.get(job, {}).get("round", -1):
                        return True
                raise
            return True
        return self._writer.submit(work)

    def hold(self, job, rnd: int, party) -> None:
        """Keep an update's file from collection (a spilled update: the file is its only copy) until
        :meth:`release`; collection would take it once its round is over, before it is folded or carried."""
        with self._held_lock:
            self._held.add(self._update_rel(job, rnd, party))

    def release(self, job, rnd: int, party) -> None:
        with self._held_lock:
            self._held.discard(self._update_rel(job, rnd, party))

    def drop_holds(self, job) -> None:
        """Let go of every hold of a removed job's files (their deletion, :meth:`_purge`, may already be done)."""
        with self._held_lock:
            self._held = {h for h in self._held if not h.startswith(os.path.join("updates", ident(job), ""))}

    def load_update(self, job, rnd: int, party, layout: jk.Layout) -> list:
        """The leaves of one persisted update (verified), in the layout's shapes."""
        tensors, m = read_checked(os.path.join(self.path, self._update_rel(job, rnd, party)), what="update file")
        return decode_leaves(tensors, json.loads(m["leaves"]), len(layout), [leaf.shape for leaf in layout.leaves])

    def stored_updates(self, job, n_leaves: int, fingerprint: str, shapes=None, admit=None) -> list:
        """[(round, party, update_id, weight, info, carried_from)] of ``job``'s updates on disk that the committed
        generation does not cover, in (round, file name) order; ``carried_from``: the round a late update was sent
        for (None: the round it lies in). Each file is read and verified here, one at a time, and its leaves are
        not kept (:meth:`load_update` reads them when they are folded). A damaged file is skipped and logged (it
        never became durable: the rename is atomic), and so is one whose update ``admit(leaves, weight, party,
        info)`` refuses (a typed :class:`~jitkernels.AggregationError`: a checksum anyone can compute vouches for
        nothing, and a NaN signed into a file failed its whole round when folded; ``shapes``: the layout's, for
        the leaves given to it); a file written for another layout than ``fingerprint`` (the job's template
        changed between runs) raises :class:`~jitkernels.LayoutMismatch` here, before anything is replayed. An
        update carried late to a later round is replayed there only: a directory written before 2026-11-28 may also
        hold its file in the round it was acknowledged for (a replay carried updates past a lowered quorum), which
        would count it twice."""
        meta = self.jobs.get(job, {})
        cur, covered = meta.get("round"), {_key(p) for p, _ in meta.get("parties", [])}
        done = set(map(int, meta.get("results", {})))
        root = os.path.join(self.path, "updates", ident(job))
        out = []
        if not os.path.isdir(root):
            return out
        for rdir in sorted((d for d in os.listdir(root) if _is_count(d)), key=int):
            r = int(rdir)
            if r in done or (cur is not None and r < cur):
                continue
            for f in sorted(os.listdir(os.path.join(root, rdir))):
                if not f.endswith(".jku"):
                    continue
                party = _party_of(f)
                if party is None:
                    continue
                if r == cur and _key(party) in covered:
                    continue
                path = os.path.join(root, rdir, f)
                try:
                    tensors, m = read_checked(path, what="update file")
                    leaves = decode_leaves(tensors, json.loads(m["leaves"]), n_leaves, shapes)
                    del tensors
                    if (m.get("format"), m.get("job"), m.get("round"), m.get("party")) != (
                            UPDATE_FORMAT, json.dumps(job), str(r), json.dumps(party)):
                        raise jk.CorruptState(f"it was written for job {m.get('job')}, round {m.get('round')}, "
                                              f"party {m.get('party')} ({m.get('format')}), not where it lies")
                    uid, weight = json.loads(m["update_id"]), jk.check_weight(float(m["weight"]), party)
                    carried = json.loads(m.get("carried_from", "null"))
                    if carried is not None and not (type(carried) is int and carried < r):
                        raise ValueError(f"carried from round {carried!r}")
                    info = json.loads(m.get("info", "{}"))  # (files written before info was saved: none)
                    if not isinstance(info, dict):
                        raise ValueError(f"per-update values {info!r}")
                except (jk.CorruptState, jk.InvalidWeight, KeyError, ValueError, TypeError, RecursionError) as e:
                    log.warning("skipping damaged update file %s: %s", path, e)
                    continue
                if m.get("layout") != fingerprint:
                    raise jk.LayoutMismatch(f"update file {path} was written for layout {m.get('layout')}; the "
                                            f"job's layout is {fingerprint} (its template changed?)", party=party)
                try:
                    if admit is not None:
                        admit(leaves, weight, party, info)
                except jk.AggregationError as e:
                    log.warning("skipping update file %s: the job refuses its update (%s)", path, e)
                    continue
                finally:
                    del leaves  # (before the next file is read: one update in memory at a time)
                out.append((r, party, uid, weight, info, carried))
        moved = {(c, _key(p)) for _, p, _, _, _, c in out if c is not None}
        return [item for item in out if (item[0], _key(item[1])) not in moved]

    # --- generations ---------------------------------------------------------------------------------------------
    def checkpoint(self, job, rnd: int, state: jk.FoldState, update_ids: dict, carried: dict | None = None,
                   opened: float | None = None, live=None) -> bool:
        """Commit a round's partial aggregate: its state file, then a new generation naming it (with the update
        ids of its parties, so that resends are recognized after a restart, and ``carried``, {party: the round its
        late update was sent for}, so that a second update for that round is still refused). False (nothing
        written) if the job has moved past the round meanwhile (its failure or result committed first, e.g. its
        deadline while the fold ran): committing it then would move the job back to a round that is over."""
        with self._lock:
            if self.jobs.get(job, {}).get("round", rnd) > rnd or live is not None and not live():
                return False  # (live() false: the job was removed, under this lock, since its fold checked)
            gen = self.gen + 1
            rel = os.path.join("states", f"{ident(job)}-r{int(rnd)}-g{gen}.jks")
            self._write("state", rel, state.writer())
            self._commit_job(job, round=int(rnd), state=rel, parties=[[p, update_ids.get(p)] for p in state.parties],
                             carried=[[p, int(c)] for p, c in (carried or {}).items() if p in state.parties],
                             **({} if opened is None else {"opened": opened}))
            return True

    def commit_result(self, job, rnd: int, layout: jk.Layout, leaves, update_ids: dict,
                      carry: jk.FoldState | None = None, predictor: list | None = None,
                      opened: float | None = None, live=None) -> None:
        """Commit a finished round: its model, the state the next round starts from (``carry``, for algorithms
        that close rounds), then a generation that names both, records the arrival predictor's models (so that a
        restart plans as well as before) and moves the job to the next round, which opens at ``opened`` (the
        clock's wall time: a restart keeps the round's deadline and response times running from it). Nothing is
        committed once ``live()`` is false (the job was removed since its finalize checked: its entry, gone with the
        tombstone, came back, and a job added again under its id resumed it)."""
        with self._lock:
            if live is not None and not live():
                raise RuntimeError(f"job {job!r} was removed from {self.path}; its round {rnd} is not committed")
            carry_rel = None
            if carry is not None:
                carry_rel = _carry_rel(job, rnd)
                self._write("state", carry_rel, carry.writer())
            tensors, dtypes = encode_leaves(leaves)
            meta = {"format": RESULT_FORMAT, "version": str(VERSION), "job": json.dumps(job),
                    "round": str(int(rnd)), "layout": layout.fingerprint, "leaves": json.dumps(dtypes),
                    "parties": json.dumps([[p, u] for p, u in update_ids.items()]),
                    "incarnation": self.jobs.get(job, {}).get("incarnation", "")}
            rel = _result_rel(job, rnd)
            self._write("result", rel, checked_writer(tensors, meta))
            self._commit_finished(job, rnd, rel, carry_rel, predictor, opened)

    def _find_unnamed(self) -> dict:
        """{job: round} of the jobs whose open round's result the directory holds though the generation in force
        does not name it: a fallback passed over the damaged generation that had finished the round (its model
        reached the round's future), or a crash came between the file and its manifest (its model reached none).
        Their files are kept from collection until the job's resume serves them or lets them go."""
        return {job: m["round"] for job, m in self.jobs.items() if m.get("round") is not None
                and str(m["round"]) not in m.get("results", {}) and str(m["round"]) not in m.get("failed", {})
                and os.path.exists(os.path.join(self.path, _result_rel(job, m["round"])))}

    def unnamed_result(self, job) -> tuple | None:
        """(round, result file, carry file or None where there is none) of ``job``'s open round where the directory
        held its result at the open, no generation naming it (:meth:`_find_unnamed`); not verified here (the caller
        knows the job: its layout, its parties, whether its rounds hand on a carry). None where there is none."""
        rnd = self._unnamed.get(job)
        if rnd is None:
            return None
        carry_rel = _carry_rel(job, rnd)
        return rnd, _result_rel(job, rnd), carry_rel if os.path.exists(os.path.join(self.path, carry_rel)) else None

    def commit_unnamed_result(self, job, rnd: int, carry_rel: str | None, opened: float | None) -> None:
        """Commit ``job``'s open round ``rnd`` as finished with the files :meth:`unnamed_result` found (verified by
        the caller), as :meth:`commit_result` would have: its updates are covered from then on, and a second restart
        serves the same result."""
        with self._lock:
            self._commit_finished(job, rnd, _result_rel(job, rnd), carry_rel, None, opened)
            del self._unnamed[job]

    def forget_unnamed_result(self, job) -> None:
        """The result :meth:`unnamed_result` found for ``job`` was not served (its round is folded again, and the job
        was added: a refused add_job keeps it for the corrected one): collected with the next commit, if the fold's
        own result has not written over it by then."""
        with self._lock:
            self._unnamed.pop(job, None)

    def _commit_finished(self, job, rnd: int, rel: str, carry_rel: str | None, predictor: list | None,
                         opened: float | None) -> None:
        old = self.jobs.get(job, {})
        self._commit_job(job, round=int(rnd) + 1, state=None, parties=[], carried=[], quorum=None,
                         results=self._recent({**old.get("results", {}), str(int(rnd)): rel}),
                         carry=carry_rel or old.get("carry"), predictor=predictor or old.get("predictor"),
                         opened=opened)

    def commit_failure(self, job, rnd: int, error: BaseException, predictor: list | None = None,
                       update_ids: dict | None = None, opened: float | None = None, live=None) -> None:
        """Commit a round that ended with an error (unreachable quorum, failed fold): the job moves on to the next
        round, which starts from the same carry; a restart resolves the round with the error again instead of
        reopening it (its updates are collected with the next generation). ``update_ids``: {party: update id} of
        the updates acknowledged for the round (late ones carried into it too), so that a resend after a restart is
        still a duplicate (it was taken as a late update, and took its party's place in the next round). ``live()``
        false: the job was removed since (under this lock, :meth:`remove_job`), and nothing is written."""
        with self._lock:
            if live is not None and not live():
                return
            old = self.jobs.get(job, {})
            failed = {**old.get("failed", {}), str(int(rnd)): [type(error).__name__, str(error)]}
            failed_parties = {**old.get("failed_parties", {}),
                              str(int(rnd)): [[p, u] for p, u in (update_ids or {}).items()]}
            self._commit_job(job, round=int(rnd) + 1, state=None, parties=[], carried=[], quorum=None,
                             failed=self._recent(failed),
                             failed_parties=self._recent(failed_parties), predictor=predictor or old.get("predictor"),
                             opened=opened)

    def commit_quorum(self, job, rnd: int, quorum: int, live=None) -> bool:
        """Commit that the open round ``rnd`` of ``job`` ends at ``quorum`` updates (the partial rule lowered it at
        its deadline): a restart finalizes it with what is in instead of waiting a whole deadline again for its full
        quorum. False (nothing written) if the job has moved past the round meanwhile, or was removed (``live()``
        false, as for :meth:`commit_failure`)."""
        with self._lock:
            if live is not None and not live() or self.jobs.get(job, {}).get("round", rnd) > rnd:
                return False
            self._commit_job(job, quorum=[int(rnd), int(quorum)])
            return True

    def commit_new(self, job, first_round: int, opened: float | None) -> bool:
        """Commit a job new to the directory, with the time its first round opens (see :meth:`commit_result`). An
        entry of nothing but that (the job was added before, and nothing of it committed since) for another first
        round is another job's, and a removed job's tombstone too: replaced (the removed job's files, any update a
        late write left included, are deleted first: the job starts afresh), unless the directory holds updates
        acknowledged for it: ValueError (they were dropped unseen, and their files deleted later). True where the
        job starts afresh, False where it resumes the directory's entry."""
        with self._lock:
            old = self.jobs.get(job)
            if old is not None and old.get("removed"):
                self._purge(job)
                old = None
            self._purged.discard(job)
            if old is None or set(old) <= {"round", "opened", "incarnation"} and old.get("round") != int(first_round):
                self._unnamed.pop(job, None)  # (another job's, or a removed one's: collected)
                held = self._update_rounds(job) if old is not None else []
                if held:
                    raise ValueError(f"job {job!r}: the state directory holds updates acknowledged for its round(s) "
                                     f"{held[:5]} of a run that began at round {old.get('round')!r}: add it with "
                                     f"first_round={old.get('round')!r} to fold them, or start it afresh in a new "
                                     "state directory")
                # (its result files record the incarnation: one that a removed job under this id left, which a
                # crash kept from collection, is not taken for this job's, see unnamed_result)
                self._commit(self.gen + 1, {**self.jobs, job: {"round": int(first_round), "opened": opened,
                                                               "incarnation": os.urandom(8).hex()}})
                return True
            return False

    def _update_rounds(self, job) -> list:
        """The rounds for which ``job``'s folder holds update files."""
        root = os.path.join(self.path, "updates", ident(job))
        if not os.path.isdir(root):
            return []
        return sorted(int(d) for d in os.listdir(root) if _is_count(d) and os.path.isdir(os.path.join(root, d))
                      and any(f.endswith(".jku") for f in os.listdir(os.path.join(root, d))))

    def commit_dropped(self, job, party, live=None) -> None:
        """Commit that ``party`` left ``job`` (``JITScheduler.drop_party``): a restart does not wait for it. Nothing
        is committed once ``live()`` is false (the job was removed: its entry may be a job's added again since)."""
        with self._lock:
            if live is not None and not live():
                return
            dropped = self.jobs.get(job, {}).get("dropped", [])
            if _key(party) not in {_key(p) for p in dropped}:
                self._commit_job(job, dropped=[*dropped, party])

    def _commit_job(self, job, **changes) -> None:
        """Commit a generation in which ``job``'s manifest entry takes ``changes`` (its other keys kept)."""
        jobs = dict(self.jobs)
        if jobs.get(job, {}).get("removed"):  # (a task of a removed job, still running when it was removed)
            raise RuntimeError(f"job {job!r} was removed from {self.path}; nothing of it is committed")
        jobs[job] = {**jobs.get(job, {}), **changes}
        self._commit(self.gen + 1, jobs)

    # --- removed jobs ---------------------------------------------------------------------------------------------
    def remove_job(self, job, decided=None):
        """Commit that ``job`` was removed (``JITScheduler.remove_job``), then delete its files. Its entry becomes
        a tombstone, ``{"removed": true}``, in two generations, so that neither retained generation names its
        states or results (the second's collection deletes them) and no fallback resumes it; then its updates go,
        and a third generation drops the tombstone (kept, every commit wrote it again: a server that removed 4,000
        jobs took 41 ms per round, 2.7 ms with none).
        ``decided()`` is called, under this directory's lock, once the tombstone is committed: from then on the
        caller's writes and commits of the job refuse themselves (``live``). The rest runs on the writer thread, after
        the writes queued before (deleted with the rest); waiting for them here, under the scheduler's lock,
        deadlocked with a durable future's callback that called the scheduler. Returns its future. A crash part-way is
        finished at the next open, and a job added again under its id starts afresh (:meth:`commit_new`)."""
        with self._lock:
            self._purged.discard(job)  # (an earlier removal's: this tombstone must be written, not filtered)
            self._commit(self.gen + 1, {**self.jobs, job: {"removed": True}})  # the decision (raises: none made)
            if decided is not None:
                decided()
        return self._writer.submit(self._finish_removal, job)

    def _finish_removal(self, job) -> None:
        with self._lock:
            if not self.jobs.get(job, {}).get("removed"):  # added again meanwhile: commit_new() did this
                return
            try:
                self._commit(self.gen + 1, dict(self.jobs))
                self._purge(job)
                self._purged.add(job)
                self._commit(self.gen + 1, dict(self.jobs))
            except Crashed:
                raise
            except Exception as e:  # removed all the same: its updates go at the next open, the rest with a commit
                log.warning("state directory %s: job %r removed, but deleting its files failed (%s)", self.path, job, e)

    def _purge(self, job) -> None:
        """Delete a removed job's updates (its spilled ones' holds too)."""
        root = os.path.join(self.path, "updates", ident(job))
        self.drop_holds(job)
        if os.path.isdir(root):
            shutil.rmtree(root)
            self._step("gc.deleted")

    def _recent(self, by_round: dict) -> dict:
        """The last ``keep_results`` entries of a {round: ...} map (older result files go at the next collection)."""
        if self.keep_results is None:
            return by_round
        return dict(sorted(by_round.items(), key=lambda kv: int(kv[0]))[-self.keep_results:])

    def load_result(self, rel: str, layout: jk.Layout, job, rnd: int, unnamed: bool = False) -> tuple:
        """(model leaves, {party: update id}) of round ``rnd`` of ``job``; CorruptState where the file's record
        names another format, job or round (a checksum anyone can compute vouches for nothing), and for a file no
        generation names (``unnamed``), another incarnation of the job (the job's entry and the file record the one
        commit_new started; files written before either did record none)."""
        tensors, meta = read_checked(os.path.join(self.path, rel), what="round result")
        if (meta.get("format"), meta.get("job"), meta.get("round")) != (RESULT_FORMAT, json.dumps(job), str(int(rnd))):
            raise jk.CorruptState(f"round result {rel} was written for job {meta.get('job')}, round "
                                  f"{meta.get('round')} ({meta.get('format')}), not job {json.dumps(job)} round {rnd}")
        if unnamed and meta.get("incarnation", "") != self.jobs.get(job, {}).get("incarnation", ""):
            raise jk.CorruptState(f"round result {rel} was written by an earlier run of job {json.dumps(job)} (one "
                                  "removed, or replaced, before this one started afresh)")
        if meta.get("layout") != layout.fingerprint:
            raise jk.LayoutMismatch(f"round result {rel} was written for layout {meta.get('layout')}; the job's "
                                    f"layout is {layout.fingerprint} (its template changed?)")
        try:
            ids = {p: u for p, u in json.loads(meta["parties"])}
            shapes = [leaf.shape for leaf in layout.leaves]
            return decode_leaves(tensors, json.loads(meta["leaves"]), len(layout), shapes), ids
        except (KeyError, ValueError, TypeError, RecursionError) as e:
            raise jk.CorruptState(f"round result {rel}: {type(e).__name__}: {str(e)[:200]}") from None

    def load_state(self, rel: str) -> jk.FoldState:
        return jk.FoldState.load(os.path.join(self.path, rel))

    def _commit(self, gen: int, jobs: dict) -> None:
        # tombstones of removed jobs whose files are gone: a fallback to the generation before finds one still
        dropped = {j for j, m in jobs.items() if j in self._purged and m.get("removed")}
        jobs = {j: m for j, m in jobs.items() if j not in dropped}
        body = {"format": MANIFEST_FORMAT, "version": VERSION, "gen": gen, "jobs": {ident(j): m for j, m in
                                                                                   jobs.items()}}
        body["checksum"] = _digest(body)
        rel, data = f"manifest-{gen:08d}.json", json.dumps(body, sort_keys=True).encode()
        try:
            self._write("manifest", rel, data)
        except Crashed:
            raise
        except BaseException:
            self._unpublish(rel, data)
            raise
        self.prev_jobs, self.jobs, self.gen = self.jobs, jobs, gen
        self._purged -= dropped
        try:
            self._gc()
        except Crashed:
            raise
        except Exception as e:  # committed all the same: what it no longer needs goes at the next collection
            log.warning("state directory %s: collection after generation %d failed (%s)", self.path, gen, e)

    def _unpublish(self, rel: str, data: bytes) -> None:
        """A manifest whose write failed after its rename (the directory's fsync, EIO) is on disk, and a restart
        would open it, though the commit failed here and its caller was told so (a remove_job that raised came back
        as done at the restart, its results and later acknowledged updates gone): it is deleted again, if the file
        of that name holds ``data`` (not one this write never reached: an older damaged generation's). Where that
        fails too, the directory dies (nothing more is written or acknowledged), the disk and this process no longer
        agreeing on what is committed."""
        path = os.path.join(self.path, rel)
        try:
            with open(path, "rb") as f:
                if f.read(len(data) + 1) != data:
                    return
            os.unlink(path)
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except FileNotFoundError:  # (the write failed before its rename: nothing to take back)
            return
        except OSError as e:
            log.error("state directory %s: a failed commit's manifest %s could not be taken back (%s): nothing more "
                      "is written here; restart from the directory", self.path, rel, e)
            self.die()

    def _load(self) -> tuple:
        """The newest generation whose manifest and files verify; older ones on failure (recorded in
        ``fallbacks``). A file that cannot be read for another reason than its absence (EIO, EMFILE, EACCES) is
        raised: an older generation reopens rounds the newer one had finished, whose results were served (served
        again from their files where those verify, else folded again: a DP round folded in another order releases
        other noise), so only a generation that does not verify is passed over (found in review: one EMFILE while
        reading a carry)."""
        gens = sorted((int(m[1]), m[0]) for m in map(_MANIFEST.fullmatch, os.listdir(self.path)) if m)
        for _, f in reversed(gens):
            try:
                with open(os.path.join(self.path, f)) as fh:
                    body = json.load(fh)
                if not isinstance(body, dict) or not isinstance(body.get("jobs"), dict):
                    raise jk.CorruptState("not a manifest")
                expected = body.pop("checksum", None)
                if body.get("format") != MANIFEST_FORMAT or expected != _digest(body):
                    raise jk.CorruptState("checksum mismatch")
                if body.get("version") != VERSION:
                    raise jk.CorruptState(f"manifest version {body.get('version')!r}; this scheduler reads "
                                          f"{VERSION}")
                jobs = {unident(j): m for j, m in body["jobs"].items()}
                for m in jobs.values():
                    _check_entry(m)
                    if m.get("state"):  # verified, not held: a job added reads its own again (held, every job's
                        # state stayed in memory from the open on, a job never added again's for good)
                        st = jk.FoldState.load(os.path.join(self.path, m["state"]))
                        if set(map(_key, st.parties)) != {_key(p) for p, _ in m["parties"]}:
                            raise jk.CorruptState(f"{m['state']} holds other parties than the manifest says")
                        del st
                    for rel in m.get("results", {}).values():  # a damaged result fails its round only
                        try:
                            read_checked(os.path.join(self.path, rel), what="round result")
                        except (OSError, jk.CorruptState) as e:
                            log.error("state directory %s: round result %s is damaged (%s)", self.path, rel, e)
                    if m.get("carry"):  # (verified the same way: the open round starts from it)
                        jk.FoldState.load(os.path.join(self.path, m["carry"]))
                return int(body["gen"]), jobs
            except (FileNotFoundError, ValueError, KeyError, TypeError, RecursionError, jk.CorruptState) as e:
                # (RecursionError: json of a crafted depth, a generation that does not verify)
                self.fallbacks.append((f, f"{type(e).__name__}: {e}"))
                log.warning("state directory %s: %s unusable (%s); trying the previous generation", self.path, f, e)
        if gens:  # starting afresh would collect every job's files: the operator decides
            raise jk.CorruptState(f"state directory {self.path}: no generation verifies ("
                                  + "; ".join(f"{f}: {why}" for f, why in self.fallbacks) + ")")
        return 0, {}

    def _gc(self) -> None:
        """Delete what the older retained generation covers: older manifests, unreferenced state files and results
        (but those a resume may serve yet: _find_unnamed), updates folded into its states or its results."""
        self._step("gc.started")
        keep_gens = {self.gen, self.gen - 1}
        for f in os.listdir(self.path):
            m = _MANIFEST.fullmatch(f)
            if m and int(m[1]) not in keep_gens:
                self._delete(os.path.join(self.path, f))
        # results (and their carries) that no generation names, until their jobs' resumes serve them or let them go
        # (_find_unnamed): collected, the round was folded again (a DP round released twice, with other noise)
        unnamed = {rel(j, r) for j, r in self._unnamed.items() for rel in (_result_rel, _carry_rel)}
        referenced = unnamed | {m[key] for jobs in (self.jobs, self.prev_jobs) for m in jobs.values()
                                for key in ("state", "carry") if m.get(key)}
        sdir = os.path.join(self.path, "states")
        if os.path.isdir(sdir):
            for f in os.listdir(sdir):
                if os.path.join("states", f) not in referenced:
                    self._delete(os.path.join(sdir, f))
        named = unnamed | {rel for jobs in (self.jobs, self.prev_jobs) for m in jobs.values()
                           for rel in m.get("results", {}).values()}
        rdir = os.path.join(self.path, "results")
        if os.path.isdir(rdir):  # results past keep_results, named by neither retained generation
            for f in os.listdir(rdir):
                if f.endswith(".jkr") and os.path.join("results", f) not in named:
                    self._delete(os.path.join(rdir, f))
        for job, m in self.prev_jobs.items():
            root = os.path.join(self.path, "updates", ident(job))
            if not os.path.isdir(root):
                continue
            done, cur = set(map(int, m.get("results", {}))), m.get("round")
            covered = {_key(p) for p, _ in m.get("parties", [])}
            for rdir in (d for d in os.listdir(root) if _is_count(d)):
                r = int(rdir)
                for f in os.listdir(os.path.join(root, rdir)):
                    if not f.endswith(".jku"):  # the writer thread's temp file of an update being persisted
                        continue
                    if r in done or (cur is not None and r < cur) or (
                            r == cur and _key(_party_of(f)) in covered):
                        with self._held_lock:  # (a hold placed meanwhile keeps its file)
                            if os.path.join("updates", ident(job), rdir, f) not in self._held:
                                self._delete(os.path.join(root, rdir, f))
                if (r in done or (cur is not None and r < cur)) and not os.listdir(os.path.join(root, rdir)):
                    try:  # a finished round's emptied folder (unless a resend's write just arrived in it)
                        os.rmdir(os.path.join(root, rdir))
                    except OSError:
                        pass

    def _delete(self, path: str) -> None:
        os.unlink(path)
        self._step("gc.deleted")

    def _start_writer(self, nice: int) -> None:
        self._writer_thread = threading.current_thread()
        renice(nice, "state directory writer")

    def close(self) -> None:
        # (from the writer's own thread, an Ack.durable callback that closes the scheduler, it cannot wait for
        # itself: the join raised, and the directory stayed locked for the process's life)
        own = threading.current_thread() is self._writer_thread
        try:
            self._writer.shutdown(wait=not self.dead and not own)
        finally:
            self.closed = True
            with self._close_lock:  # (two threads' close() closed the file at once: "I/O operation on closed file")
                if not self._lockf.closed:
                    self._lockf.close()  # closing the descriptor releases the flock


def same_leaves(a, b) -> bool:
    """Whether two models' flattened leaves are the same bits, as a file holds them (device leaves copied)."""
    (ta, da), (tb, db) = encode_leaves(a), encode_leaves(b)
    return da == db and ta.keys() == tb.keys() and all(
        ta[k].shape == tb[k].shape and ta[k].tobytes() == tb[k].tobytes() for k in ta)


def _party_of(name: str):
    """The party id an update file's name encodes, or None (no party id is) for a name this directory did not write
    (a stray ``._<hex>.jku`` an operating system's copy leaves)."""
    try:
        return unident(name[:-4])
    except ValueError:
        return None


def _key(party):
    """Party ids as they compare after a JSON round trip (party ids are str or int)."""
    return json.dumps(party)


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

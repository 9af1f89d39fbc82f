"""FoldState files: round trip, corruption detection, old format versions, atomic writes, kill -9 and resume."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import jitkernels as jk
from jitkernels.state import atomic_write

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "data"))
from make_golden import golden_inputs  # noqa: E402


def _agg(acc="float32", base=False):
    rng = np.random.default_rng(0)
    tmpl = {"a": rng.standard_normal((6, 5)).astype(np.float32), "b": np.zeros(3, np.float16)}
    agg = jk.Aggregator(tmpl, acc_dtype=acc, base=tmpl if base else None)
    for j in range(3):
        agg.fold({"a": rng.standard_normal((6, 5)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float16)},
                 weight=j + 1, party=f"p{j}" if j else 0)
    return agg


@pytest.mark.parametrize("acc", ["float32", "float64"])
@pytest.mark.parametrize("base", [False, True])
def test_round_trip_is_bit_identical(tmp_path, acc, base):
    agg = _agg(acc, base)
    path = tmp_path / "s.jks"
    agg.state.save(path)
    loaded = jk.FoldState.load(path)
    assert loaded.same_bits(agg.state)
    assert list(loaded.parties) == list(agg.state.parties)  # insertion order (fold order) kept; int ids stay int
    assert [f for f in os.listdir(tmp_path) if f != "s.jks"] == []  # no temp file left behind


def test_save_replaces_atomically(tmp_path):
    path = tmp_path / "s.jks"
    _agg().state.save(path)
    agg = _agg("float64")
    agg.state.save(path)
    assert jk.FoldState.load(path).acc_dtype == "float64"


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "s.jks"
    _agg().state.save(path)
    old = path.read_bytes()

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), b"new contents")
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["s.jks"]


def _rewrite_metadata(path, fn):
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    fn(header["__metadata__"])
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    assert len(new) == n, "test helper: header grew"
    path.write_bytes(bytes(raw[:8]) + new + bytes(raw[8 + n:]))


@pytest.mark.parametrize("damage", ["flip_data", "truncate", "empty", "garbage", "version", "format", "parties"])
def test_corrupt_files_are_refused(tmp_path, damage):
    path = tmp_path / "s.jks"
    _agg().state.save(path)
    raw = bytearray(path.read_bytes())
    if damage == "flip_data":
        raw[-3] ^= 0x40
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(300))
    elif damage == "version":
        _rewrite_metadata(path, lambda m: m.update(version="9"))
    elif damage == "format":
        _rewrite_metadata(path, lambda m: m.update(format="other.thing"))
    elif damage == "parties":
        _rewrite_metadata(path, lambda m: m.update(parties=m["parties"].replace("p1", "p9")))
    with pytest.raises(jk.CorruptState):
        jk.FoldState.load(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        jk.FoldState.load(tmp_path / "nope.jks")


def test_trees_nested_past_the_limit_are_refused_by_the_template_and_by_the_file():
    """The layout's walks recurse: a template nested 900 deep raised RecursionError, and a crafted file's tree of
    that depth loaded (its check does not recurse) and failed at finalize. Both are refused by name now."""
    t = np.zeros(2, np.float32)
    for _ in range(jk.layout.MAX_DEPTH + 1):
        t = [t]
    with pytest.raises(TypeError, match="nests deeper than 256"):
        jk.Aggregator(t)
    td = {"t": "leaf"}
    for _ in range(500):
        td = {"t": "list", "c": [td]}
    with pytest.raises(ValueError, match="nests deeper than 256"):
        jk.Layout.from_json({"leaves": [["0" + ".0" * 499, [2], "float32"]], "treedef": td})
    t = np.zeros(2, np.float32)  # what the old code saved (it took up to ~450) loads up to the limit
    for _ in range(jk.layout.MAX_DEPTH):
        t = [t]
    agg = jk.Aggregator(t)
    agg.fold(t, 1.0, "a")
    assert jk.Aggregator.from_state(jk.FoldState.from_bytes(agg.state.to_bytes())).count == 1


def test_a_state_file_that_is_there_but_cannot_be_opened_is_not_file_not_found(tmp_path, monkeypatch):
    """safetensors reports every failure to open a file as FileNotFoundError ("too many open files" too): a resume
    that starts afresh on FileNotFoundError dropped an intact state. The OS's own error comes through instead."""
    import safetensors

    path = str(tmp_path / "s.jks")
    agg = jk.Aggregator({"w": np.zeros(2, np.float32)})
    agg.fold({"w": np.ones(2, np.float32)}, 1.0, "a")
    agg.state.save(path)

    def emfile(*_, **__):
        raise FileNotFoundError("No such file or directory")  # what safe_open raises for EMFILE

    monkeypatch.setattr(safetensors, "safe_open", emfile)
    with pytest.raises(OSError, match="exists") as err:
        jk.FoldState.load(path)
    assert not isinstance(err.value, FileNotFoundError)


@pytest.mark.parametrize("umask", [0o077, 0o022])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    """Files get a plain open's mode under the process's umask, by either path (bytes were written 0644 whatever
    the umask: secure aggregation's state and the scheduler's journal world-readable under umask 077)."""
    old = os.umask(umask)
    try:
        atomic_write(str(tmp_path / "b"), b"secret")
        agg = jk.Aggregator({"w": np.zeros(2, np.float32)})
        agg.fold({"w": np.ones(2, np.float32)}, 1.0, "a")
        agg.state.save(str(tmp_path / "s.jks"))
    finally:
        os.umask(old)
    for name in ("b", "s.jks"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_states_that_lack_what_their_algorithm_needs_are_corrupt_state():
    """A checksummed state without the base its algorithm folds against, without a robust rule's store, or without
    a server optimizer's moments is refused by name (each failed untyped at finalize, after folds were taken)."""
    from jitkernels import robust as R
    from jitkernels.state import checked_bytes, read_checked_bytes

    def without(agg, drop_tensor, drop_meta=None):
        t, m = read_checked_bytes(agg.state.to_bytes())
        t = {k: np.ascontiguousarray(v) for k, v in t.items() if not k.startswith(drop_tensor)}
        return jk.FoldState.from_bytes(checked_bytes(t, {k: v for k, v in m.items() if k != drop_meta}))

    tmpl = {"a": np.ones(4, np.float32)}
    adam = jk.Aggregator(tmpl, jk.algorithms.FedAdam(), base=tmpl)
    adam.fold({"a": np.full(4, 2, np.float32)}, 1.0, "p")
    with pytest.raises(jk.CorruptState, match="no base"):
        jk.Aggregator.from_state(without(adam, "base"))
    resumed = jk.Aggregator.from_state(without(adam, "opt_"))
    with pytest.raises(jk.CorruptState, match="moments"):
        resumed.finalize()
    median = jk.Aggregator(tmpl, R.FedMedian())
    median.fold({"a": np.full(4, 2, np.float32)}, 1.0, "p")
    with pytest.raises(jk.CorruptState, match="no store"):
        jk.Aggregator.from_state(without(median, "store_", "store"))


def test_a_torch_jobs_state_comes_back_as_torch_in_a_process_that_has_not_imported_torch(tmp_path):
    """Results of a torch template are torch tensors wherever the state is resumed: numpy_to_torch read torch from
    sys.modules, and a resumed job or a Ray worker that had not imported it failed with 'NoneType' has no
    'from_numpy'. A Ray worker's fold of a torch job does not need torch at all."""
    path = str(tmp_path / "s.jks")
    agg = jk.Aggregator({"w": torch.zeros(3), "b": torch.zeros(2, dtype=torch.bfloat16)})
    agg.fold({"w": torch.ones(3), "b": torch.ones(2, dtype=torch.bfloat16)}, 1.0, "a")
    agg.state.save(path)
    spec = {"layout": agg.state.layout.to_json(), "algorithm": agg.state.algorithm, "acc_dtype": "float32",
            "round": 0, "scalars": {}, "backend": "auto"}
    code = textwrap.dedent(f"""
        import json, sys
        import numpy as np, ml_dtypes, jitkernels as jk
        from scheduler.executors import _fold_partial
        assert "torch" not in sys.modules
        part = _fold_partial(json.loads({json.dumps(json.dumps(spec))}), None,
                             [[np.full(3, 5, np.float32), np.full(2, 5, ml_dtypes.bfloat16)]], [1.0], ["w"], [{{}}])
        print("worker", "torch" in sys.modules, len(part) > 0)
        agg = jk.Aggregator.from_state(jk.FoldState.load({path!r}))
        agg.fold({{"w": np.full(3, 3, np.float32), "b": np.full(2, 3, ml_dtypes.bfloat16)}}, 1.0, "b")
        out = agg.finalize()
        print(type(out["w"]).__name__, out["w"].tolist(), str(out["b"].dtype))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(HERE), timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["worker False True", "Tensor [2.0, 2.0, 2.0] torch.bfloat16"]


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(HERE, "data")) if f.endswith(".jks")))
def test_golden_files_of_every_version_still_load(name):
    state = jk.FoldState.load(os.path.join(HERE, "data", name))
    tmpl, ups, ws = golden_inputs()
    assert sorted(map(str, state.parties)) == ["7", "alice", "bob"] and state.total_weight == sum(ws)
    out = jk.Aggregator.from_state(state, partial="partial" in name).finalize()
    want = sum(w * u["enc"]["w"].astype(np.float64) for u, w in zip(ups, ws)) / sum(ws)
    np.testing.assert_allclose(out["enc"]["w"], want, rtol=1e-6)
    assert out["enc"]["b"].dtype == np.float16 and int(out["steps"]) == round((10 + 40 + 90) / 6)
    if "partial" in name:  # bob's update lacked "head": it is the mean of alice's and 7's
        assert state.absent == {"bob": tuple(i for i, leaf in enumerate(state.layout.leaves) if leaf.name == "head")}
        want = (ws[0] * ups[0]["head"].astype(np.float64) + ws[2] * ups[2]["head"]) / (ws[0] + ws[2])
        np.testing.assert_allclose(out["head"], want, rtol=1e-12)


def test_merge_refusals():
    a, b = _agg(), _agg()
    before = a.state.copy()  # (taken before the refusals: each must leave the state as it was)
    with pytest.raises(jk.OverlappingParties, match="p1"):
        a.merge(b)
    c = jk.Aggregator({"x": np.zeros(2, np.float32)})
    with pytest.raises(jk.IncompatibleStates, match="layouts"):
        a.merge(c)
    d = jk.Aggregator(a.layout, acc_dtype="float64")
    with pytest.raises(jk.IncompatibleStates, match="accumulators"):
        a.merge(d)
    assert a.state.same_bits(before)


WORKER = textwrap.dedent("""
    import sys, numpy as np, jitkernels as jk
    path, n = sys.argv[1], int(sys.argv[2])
    tmpl = {"w": np.zeros((50, 40), np.float32), "b": np.zeros(40, np.float32)}
    def update(j):
        rng = np.random.default_rng(j)
        return {"w": rng.standard_normal((50, 40)).astype(np.float32), "b": rng.standard_normal(40).astype(np.float32)}
    import os
    agg = jk.Aggregator.from_state(jk.FoldState.load(path)) if os.path.exists(path) else jk.Aggregator(tmpl)
    for j in range(n):
        if j in agg.state.parties:
            continue
        agg.fold(update(j), weight=1 + j % 5, party=j)
        agg.state.save(path)
        print(j, flush=True)
    print("done", flush=True)
""")


@pytest.mark.parametrize("kill_after", [1, 4, 9])
def test_kill_9_then_resume_equals_uninterrupted(tmp_path, kill_after):
    n = 12
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ref_path, path = tmp_path / "ref.jks", tmp_path / "run.jks"
    subprocess.run([sys.executable, str(script), str(ref_path), str(n)], check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(n)], stdout=subprocess.PIPE, text=True)
    seen = 0
    for line in proc.stdout:
        seen += 1
        if seen == kill_after:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run([sys.executable, str(script), str(path), str(n)], check=True, capture_output=True,
                             text=True)
    assert resumed.stdout.strip().endswith("done")
    got, want = jk.FoldState.load(path), jk.FoldState.load(ref_path)
    assert set(got.parties) == set(range(n))
    # same fold order for the parties, so the same bits
    assert got.acc.tobytes() == want.acc.tobytes()


def test_checked_writer_writes_the_bytes_of_checked_bytes(tmp_path):
    """atomic_write with a writer (safetensors' save_file, no bytes built in memory) gives the file checked_bytes
    gives (the same tensors and checksummed metadata; safetensors' two writers order the metadata keys
    differently), and a failing writer leaves no temp file behind."""
    from jitkernels.state import atomic_write, checked_bytes, checked_writer, is_temp_file, read_checked

    rng = np.random.default_rng(4)
    tensors = {"acc": rng.standard_normal(1000).astype(np.float32), "lo": np.arange(7, dtype=np.float64)}
    meta = {"format": "x", "parties": "[1, 2]"}
    atomic_write(str(tmp_path / "a"), checked_bytes(tensors, meta))
    steps = []
    atomic_write(str(tmp_path / "b"), checked_writer(tensors, meta), on_step=steps.append)
    (ta, ma), (tb, mb) = read_checked(str(tmp_path / "a")), read_checked(str(tmp_path / "b"))
    assert ma == mb == meta and ta.keys() == tb.keys() == tensors.keys()
    assert all(ta[n].tobytes() == tb[n].tobytes() == tensors[n].tobytes() for n in tensors)
    assert steps == ["tmp_synced", "renamed", "dir_synced"]

    def broken(path):
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(tmp_path / "c"), broken)
    assert not (tmp_path / "c").exists() and not any(is_temp_file(p.name) for p in tmp_path.iterdir())


def test_a_checksummed_state_with_arrays_of_the_wrong_shape_is_refused():
    """A file whose checksum matches but whose base (or leaf weights) does not fit its layout is CorruptState: the
    kernels would index it by the layout, out of bounds."""
    from jitkernels.state import FoldState, checked_bytes, read_checked_bytes

    agg = jk.Aggregator({"w": np.zeros(8, np.float32)}, backend="numpy", base={"w": np.zeros(8, np.float32)})
    agg.fold({"w": np.ones(8, np.float32)}, party="p")
    tensors, meta = read_checked_bytes(agg.state.to_bytes())
    for name in ("base", "leaf_weight"):
        bad = dict(tensors, **{name: tensors[name][:0].copy()})
        with pytest.raises(jk.CorruptState, match=name):
            FoldState.from_bytes(checked_bytes(bad, meta))
    with pytest.raises(jk.CorruptState):
        FoldState.from_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]")


@pytest.mark.parametrize("edit, what", [
    (lambda lay: lay["treedef"].update({"k": ["a"], "c": [{"t": "leaf"}]}), "tree has 1 leaves"),
    (lambda lay: lay["leaves"][1].__setitem__(2, "complex128"), "supported dtype"),
    (lambda lay: lay["leaves"][1].__setitem__(2, "no-such-dtype"), "supported dtype"),
    (lambda lay: lay["leaves"][0].__setitem__(1, [-3]), "supported dtype"),
    (lambda lay: lay["treedef"]["c"].__setitem__(0, {"t": "set"}), "malformed node"),
    (lambda lay: lay.update({"array_type": "jax"}), "array type"),
    (None, "recursion"),
    (lambda lay: lay["treedef"].update({"k": ["a", "a"]}), "malformed node"),  # finalize put b's values under a
    (lambda lay: lay["leaves"][0].__setitem__(0, "z"), "tree has 2 leaves"),  # names the tree does not give
    (lambda lay: [lay["leaves"][i].__setitem__(0, "a") for i in (0, 1)], "tree has 2 leaves"),
], ids=["tree_vs_leaves", "complex", "unknown_dtype", "negative_shape", "bad_node", "array_type", "deep_json",
        "duplicate_keys", "renamed_leaf", "one_name_twice"])
def test_a_checksummed_state_with_an_impossible_layout_is_refused(edit, what):
    """A layout that from_template could not have made (read from a file whose checksum matches: a bug or a crafted
    file) is CorruptState at load, not a wrong or untyped failure at finalize."""
    import json

    from jitkernels.state import FoldState, checked_bytes, read_checked_bytes

    agg = jk.Aggregator({"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)})
    agg.fold({"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}, party="p")
    tensors, meta = read_checked_bytes(agg.state.to_bytes())
    if edit is None:
        meta = dict(meta, layout="[" * 100_000 + "]" * 100_000)
    else:
        lay = json.loads(meta["layout"])
        edit(lay)
        meta = dict(meta, layout=json.dumps(lay))
    with pytest.raises(jk.CorruptState, match=what):
        FoldState.from_bytes(checked_bytes(tensors, meta))


def test_atomic_write_is_not_blocked_by_a_leftover_temp_file(tmp_path):
    """A temp file a dead process left with our pid's name (pid 1 again in a container) no longer blocks a write."""
    path = tmp_path / "s.jks"
    (tmp_path / f".s.jks.{os.getpid()}.tmp").write_bytes(b"left by a crash")
    atomic_write(str(path), b"new")
    assert path.read_bytes() == b"new"


@pytest.mark.parametrize("what, tensors_edit, meta_edit, match", [
    ("nan_acc", {"acc": np.full(4, np.nan, np.float32)}, {}, "acc is not 4 finite"),
    ("inf_base", {"base": np.full(4, np.inf, np.float32)}, {}, "base is not 4 finite"),
    ("tiny_leaf_weight", {"leaf_weight": np.array([1e-30])}, {}, "per-leaf weights"),
    ("negative_leaf_weight", {"leaf_weight": np.array([-2.0])}, {}, "per-leaf weights"),
    ("negative_party", {}, {"parties": '[["a", -1.0], ["b", 1.0]]'}, "party's weight"),
    ("nan_party", {}, {"parties": '[["a", NaN], ["b", 1.0]]'}, "party's weight"),
    ("negative_round", {}, {"round": "-7"}, "round -7"),
    ("bad_int_rule", {}, {"algorithm": '{"name": "fedavg", "int_leaves": "median"}'}, "int_leaves"),
    ("deterministic_5000", {}, {"algorithm": '{"name": "fedavg", "deterministic": 5000}'}, "deterministic"),
    ("wrapping_shape", {}, {"layout": None}, "values"),
    # an empty state is all zeros (a rejected first batch is undone by zeroing it again, a fold relies on it)
    ("nonzero_empty", {"leaf_weight": np.zeros(1)}, {"parties": "[]"}, "no parties holds non-zero"),
    ("overflowing_parties", {}, {"parties": '[["a", 1e308], ["b", 1e308]]'}, "past float64's range"),
    # a leaf no party carried, holding sums (finalize divided them by the total weight: a model 3x off); a round
    # past DP noise's 32-bit counter (a bare ValueError at finalize)
    ("zero_leaf_weight", {"leaf_weight": np.zeros(1)}, {}, "leaf 'w' has a weight of 0 and non-zero sums"),
    ("huge_round", {}, {"round": str(2 ** 64)}, "round 18446744073709551616 is outside \\[0, 2\\^32\\)"),
    ("nan_scalar", {}, {"scalars": '{"clip_norm": NaN}'}, "server value 'clip_norm' = nan is not a finite number"),
])
def test_a_checksummed_state_a_fold_could_not_have_made_is_refused(what, tensors_edit, meta_edit, match):
    """SHA-256 is unkeyed: anyone can re-sign a file. Values no fold makes (a NaN accumulator merged into a NaN
    model; a leaf weight of 1e-30 against parties of weight 2 made a 2e30 model; negative or NaN party weights; a
    deterministic bound of 2^5000; an integer rule no aggregator has; a shape whose int64 product wraps to the
    file's size) are CorruptState at load, not a wrong model or an untyped error later."""
    import json

    from jitkernels.state import FoldState, checked_bytes, read_checked_bytes

    agg = jk.Aggregator({"w": np.zeros(4, np.float32)}, backend="numpy", base={"w": np.zeros(4, np.float32)})
    agg.fold_many([{"w": np.ones(4, np.float32)}] * 2, parties=["a", "b"])
    tensors, meta = read_checked_bytes(agg.state.to_bytes())
    FoldState.from_bytes(checked_bytes(tensors, meta))  # as written: loads
    if meta_edit.get("layout", "") is None:
        lay = json.loads(meta["layout"])
        lay["leaves"][0][1] = [2 ** 32, 2 ** 32, 1]
        meta_edit = {"layout": json.dumps(lay)}
    with pytest.raises(jk.CorruptState, match=match):
        FoldState.from_bytes(checked_bytes({**tensors, **tensors_edit}, {**meta, **meta_edit}))


def test_server_optimizer_moments_no_step_makes_are_refused():
    """A second moment below 0 (Adam's, Yogi's and Adagrad's steps take its square root) loaded, then made the
    model NaN at the next finalize and blamed the next round's parties; an optimizer state of another name was
    refused as "must be float32[4]"."""
    from jitkernels.state import FoldState, checked_bytes, read_checked_bytes

    z = {"w": np.zeros(4, np.float32)}
    for alg in ("fedadam", "fedyogi", "fedadagrad"):
        agg = jk.Aggregator(z, alg, base=z)
        agg.fold({"w": np.ones(4, np.float32)}, party="a")
        agg.finalize()
        tensors, meta = read_checked_bytes(agg.state.to_bytes())
        FoldState.from_bytes(checked_bytes(tensors, meta))  # as written: loads
        v = tensors["opt_v"].copy()
        v[2] = -1.0
        with pytest.raises(jk.CorruptState, match="opt_v, a second moment, holds negative values"):
            FoldState.from_bytes(checked_bytes({**tensors, "opt_v": v}, meta))
    with pytest.raises(jk.CorruptState, match="optimizer state 'zzz' is none of"):
        FoldState.from_bytes(checked_bytes({**tensors, "opt_zzz": v}, meta))


def test_a_robust_store_whose_leaf_names_are_not_the_layouts_is_refused():
    """A robust state's store keeps the leaf order its rows were added in, and reads later dict updates in it: a
    file with two leaves of one size named the other way round put every later party's leaves in each other's
    place (a wrong median, no error); bogus names refused every later party by name."""
    from jitkernels.state import FoldState, checked_bytes, read_checked_bytes

    t = {"w": np.zeros(3, np.float32), "b": np.zeros(3, np.float32)}
    agg = jk.Aggregator(t, "fedmedian")
    agg.fold({"w": np.full(3, 2.0, np.float32), "b": np.full(3, 100.0, np.float32)}, party="a")
    tensors, meta = read_checked_bytes(agg.state.to_bytes())
    FoldState.from_bytes(checked_bytes(tensors, meta))  # as written: loads
    store = json.loads(meta["store"])
    for names in (["b", "w"], ["x", "y"]):
        with pytest.raises(jk.CorruptState, match="store's leaf names .* are not the layout's"):
            FoldState.from_bytes(checked_bytes(tensors, {**meta, "store": json.dumps({**store, "names": names})}))


def test_an_algorithm_record_no_algorithm_makes_is_corrupt_state():
    """The file loads (a user's own algorithm's record would too); resuming from it names the record instead of a
    plain TypeError from the algorithm's constructor."""
    from jitkernels.state import FoldState, checked_bytes, read_checked_bytes

    agg = jk.Aggregator(np.zeros(4, np.float32))
    agg.fold(np.ones(4, np.float32), party="a")
    tensors, meta = read_checked_bytes(agg.state.to_bytes())
    st = FoldState.from_bytes(checked_bytes(tensors, dict(meta, algorithm='{"name": "fedavg", "bogus": 1}')))
    with pytest.raises(jk.CorruptState, match="does not rebuild"):
        jk.Aggregator.from_state(st)


def test_per_party_records_and_server_values_are_checked_when_a_state_is_resumed():
    """A checksummed state whose per-party records or server values its algorithm could not have written: FedNova
    without steps, or with steps of -3, DP adaptive clipping without its clip norm, with a clip norm outside the
    range its rule keeps it in, or with an unclipped count of 7 (bare KeyErrors at the next fold or finalize, a wrong
    model, clipping turned off) is CorruptState naming the party and value."""
    from jitkernels.state import FoldState, checked_bytes, read_checked_bytes

    z = {"w": np.zeros(3)}
    nova = jk.Aggregator(z, jk.algorithms.FedNova(), base=z)
    nova.fold({"w": np.ones(3)}, party="p", steps=2)
    dp = jk.Aggregator(z, jk.algorithms.DPAdaptiveClipping("fedavg", noise_multiplier=0.0, num_sampled=2), base=z)
    dp.fold({"w": np.ones(3)}, party="p")
    for agg, edit, match in ((nova, {"info": '[["p", {}]]'}, "party 'p': steps is required"),
                             (nova, {"info": '[["p", {"steps": -3}]]'}, "party 'p': steps = -3.0 must be"),
                             (dp, {"info": '[["p", {"unclipped": 7.0}]]'}, "party 'p': unclipped = 7.0"),
                             (dp, {"scalars": "{}"}, "keeps server values \\['clip_norm'\\]"),
                             # a forged clip norm: 1e308 clipped nothing, unseen; 0 or less refused every party
                             (dp, {"scalars": '{"clip_norm": 1e308}'}, "'clip_norm' = 1e\\+308 is neither"),
                             (dp, {"scalars": '{"clip_norm": 0.0}'}, "'clip_norm' = 0.0 is neither")):
        tensors, meta = read_checked_bytes(agg.state.to_bytes())
        jk.Aggregator.from_state(FoldState.from_bytes(checked_bytes(tensors, meta)))  # as written: resumes
        with pytest.raises(jk.CorruptState, match=match):
            jk.Aggregator.from_state(FoldState.from_bytes(checked_bytes(tensors, {**meta, **edit})))
        if "info" in edit:  # merged into a live aggregator (a worker's partial state: the Ray executor's path)
            live = jk.Aggregator.from_state(FoldState.from_bytes(checked_bytes(tensors, meta)))
            live.reset()
            with pytest.raises(jk.CorruptState, match=match):
                live.merge(FoldState.from_bytes(checked_bytes(tensors, {**meta, **edit})))
            assert live.state.count == 0


def test_an_acc_dtype_numpy_cannot_parse_is_corrupt_state():
    """np.dtype of a 5,000-digit string raises SyntaxError, which escaped the load (the Ray executor's path reads
    partial states from bytes) as an untyped error."""
    from jitkernels.state import FoldState, checked_bytes, read_checked_bytes

    agg = jk.Aggregator(np.zeros(4, np.float32))
    agg.fold(np.ones(4, np.float32), party="a")
    tensors, meta = read_checked_bytes(agg.state.to_bytes())
    with pytest.raises(jk.CorruptState, match="SyntaxError"):
        FoldState.from_bytes(checked_bytes(tensors, dict(meta, acc_dtype="9" * 5000)), where="ray partial fold")


def test_a_robust_state_takes_only_the_store_record_a_save_writes(tmp_path):
    """The robust store's record came to UpdateStore as keyword arguments: a file could name a spill directory
    (created, and written to) or a budget, ask for 2^50 rows (an untyped MemoryError), or list other parties than the
    state's record (a KeyError at finalize). Only k_max, dtype and parties are read and checked."""
    import json

    import jitkernels.robust as R
    from jitkernels.state import FoldState, checked_bytes, read_checked_bytes

    agg = jk.Aggregator({"w": np.zeros(4, np.float32)}, R.FedMedian())
    agg.fold_many([{"w": np.full(4, float(i), np.float32)} for i in range(3)], parties=list("abc"))
    tensors, meta = read_checked_bytes(agg.state.to_bytes())
    store = json.loads(meta["store"])
    spill = tmp_path / "chosen"
    loaded = FoldState.from_bytes(checked_bytes(tensors, dict(meta, store=json.dumps(
        {**store, "spill_dir": str(spill), "budget_bytes": 0, "over_budget": "spill"}))))
    assert not loaded.store.spilled and not spill.exists()
    for bad, match in (({"k_max": 2 ** 50}, "allocate"), ({"k_max": 0}, "k_max"), ({"parties": ["a", "b", "x"]},
                                                                                  "other parties")):
        with pytest.raises(jk.CorruptState, match=match):
            FoldState.from_bytes(checked_bytes(tensors, dict(meta, store=json.dumps({**store, **bad}))))


def test_states_a_fold_can_make_still_load(tmp_path):
    """The load-time checks refused legitimate states (found in review): a user's own algorithm (merged as a partial
    state, rebuilt only by from_state), a robust rule with k_max past 2^20, robust weights near float64's range."""
    import copy

    import jitkernels.robust as R
    from jitkernels.algorithms import FedAvg
    from jitkernels.state import FoldState

    class MyAlg(FedAvg):
        name = "myalg"
    t = {"w": np.zeros(4, np.float32)}
    ups = [{"w": np.full(4, float(i), np.float32)} for i in range(3)]
    for alg, ws in ((MyAlg(), [1.0] * 3), (R.FedMedian(k_max=2 ** 21), [1.0] * 3), (R.FedMedian(), [1e308] * 3)):
        agg = jk.Aggregator(t, alg)
        agg.fold_many(ups, ws, parties=list("abc"))
        agg.state.save(tmp_path / "s.jks")
        back = FoldState.load(tmp_path / "s.jks")
        assert back.same_bits(agg.state)
        assert copy.deepcopy(back).same_bits(back)  # (the state's lock is not copied: a new one)


def test_a_gpu_jobs_state_resumes_on_a_machine_without_a_gpu_on_the_cpu_backend_it_names(tmp_path):
    """A state saved by a GPU aggregator (a CuPy template), loaded where CuPy cannot run: backend='auto' is refused
    with the reason and the way out (no silent fallback), a named CPU backend resumes it with results as host
    arrays, equal to a host run's. It raised ModuleNotFoundError at finalize (uploading the result for the CuPy
    template), and BackendUnavailable without a hint."""
    fake_cupy = pytest.importorskip("fake_cupy")
    if jk.available_backends()["cupy"] is True:
        pytest.skip("a GPU backend runs here: the state would resume on it")
    rng = np.random.default_rng(3)
    tmpl = {"w": np.zeros(500, np.float32), "n": np.zeros((), np.int64)}
    ups = [{"w": rng.standard_normal(500).astype(np.float32), "n": np.array(j, np.int64)} for j in range(4)]
    path = tmp_path / "gpu.jks"
    with fake_cupy.installed():
        import cupy as cp
        gpu = jk.Aggregator({n: cp.asarray(a) for n, a in tmpl.items()}, deterministic=True)
        gpu.fold_many(ups[:2], [1.0, 2.0], parties=[0, 1])
        gpu.state.save(path)
    state = jk.FoldState.load(path)
    with pytest.raises(jk.BackendUnavailable, match="backend='cpp'"):
        jk.Aggregator.from_state(state)
    cpu = jk.Aggregator.from_state(state, backend="cpp")
    cpu.fold_many(ups[2:], [3.0, 4.0], parties=[2, 3])
    ref = jk.Aggregator(tmpl, deterministic=True)
    ref.fold_many(ups, [1.0, 2.0, 3.0, 4.0], parties=[0, 1, 2, 3])
    got, want = cpu.finalize(), ref.finalize()
    assert all(type(got[n]) is np.ndarray and got[n].tobytes() == want[n].tobytes() for n in want)



def test_a_state_of_many_parties_saves_past_the_header_limit(tmp_path):
    """safetensors refuses a header past 100 MB: a state of 1,800 parties with the longest ids (or a million of 60
    characters) failed every save with its untyped SafetensorError. Long metadata values go in tensors now."""
    from jitkernels.state import SPILLED_KEY, checked_bytes, read_checked_bytes

    agg = jk.Aggregator({"w": np.zeros(2, np.float32)})
    ids = ["x" * 60_000 + str(i) for i in range(1800)]
    agg.fold_many([{"w": np.ones(2, np.float32)}] * len(ids), parties=ids)
    agg.state.save(tmp_path / "big.jks")
    for st in (jk.FoldState.load(tmp_path / "big.jks"), jk.FoldState.from_bytes(agg.state.to_bytes())):
        assert st.same_bits(agg.state) and list(st.parties) == ids
    small = jk.Aggregator({"w": np.zeros(2, np.float32)})  # (a usual state's file is as it was: nothing spilled)
    small.fold({"w": np.ones(2, np.float32)}, party="p")
    tensors, meta = read_checked_bytes(small.state.to_bytes())
    assert SPILLED_KEY not in meta and set(tensors) == {"acc", "leaf_weight"}
    # a forged file naming a spilled value it lacks (the checksum is unkeyed: anyone can recompute it)
    for forged in ('["parties"]', "[" * 100_000):  # (a list too deep for json: RecursionError escaped)
        with pytest.raises(jk.CorruptState, match="cannot be read back"):
            read_checked_bytes(checked_bytes({"a": np.zeros(1)}, {SPILLED_KEY: forged}))


def test_a_failed_write_of_a_state_file_is_an_oserror(tmp_path, monkeypatch):
    """safetensors reports a full disk (a write past RLIMIT_FSIZE) as its own SafetensorError, no OSError: the state
    directory, which catches OSError for a failed write, let it through as an unknown error."""
    import safetensors
    import safetensors.numpy

    def full(*a, **k):
        raise safetensors.SafetensorError("I/O error: File too large (os error 27)")

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    agg = jk.Aggregator({"w": np.zeros(4, np.float32)})
    agg.fold({"w": np.ones(4, np.float32)}, party="p")
    with pytest.raises(OSError, match="File too large") as e:
        agg.state.save(tmp_path / "s.jks")
    assert e.value.errno == 27 and os.listdir(tmp_path) == []


def test_merge_refuses_states_whose_server_values_differ_and_takes_the_max_of_int_leaves():
    """Mutation testing found these untested: two DP adaptive-clipping states at different clip norms merged
    (updates clipped to different C, summed as one), and merging int_leaves="max" states took the other's values
    where both held some (Hypothesis alone, in the stateful test, caught it)."""
    t = {"w": np.zeros(4, np.float32)}

    def dp():
        return jk.Aggregator(t, jk.algorithms.DPAdaptiveClipping(noise_multiplier=0.0, num_sampled=2, seed=1), base=t)
    a, b = dp(), dp()
    for agg, v in ((a, 0.01), (b, 5.0)):  # the round closes at finalize: each updates its clip norm
        agg.fold({"w": np.full(4, v, np.float32)}, 1.0, "p0")
        agg.finalize()
        agg.reset(base=t)
    assert a.state.scalars != b.state.scalars
    a.fold({"w": np.ones(4, np.float32)}, 1.0, "p1")
    b.fold({"w": np.ones(4, np.float32)}, 1.0, "p2")
    with pytest.raises(jk.IncompatibleStates, match="server values"):
        a.merge(b)
    t = {"w": np.zeros(2, np.float32), "n": np.zeros(2, np.int64)}
    a, b = jk.Aggregator(t, int_leaves="max"), jk.Aggregator(t, int_leaves="max")
    a.fold({"w": np.ones(2, np.float32), "n": np.array([9, 1])}, 1.0, "a")
    b.fold({"w": np.ones(2, np.float32), "n": np.array([3, 4])}, 1.0, "b")
    a.merge(b)
    assert a.finalize()["n"].tolist() == [9, 4]

"""jitkernels' strategy for Flower's Message API (``flwr.serverapp.strategy``) against Flower's own on the same reply
Messages: equal within float32 rounding; the new ArrayRecord's Arrays carry our bytes (no copy out)."""

import time

import numpy as np
import pytest

pytest.importorskip("flwr", reason="Flower (flwr) is a test dependency: pip install -e '.[test]'")
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import strategy as ms  # noqa: E402

import jitkernels as jk  # noqa: E402
import jitkernels.integrations.flower as jkfl  # noqa: E402


def _reply(j, arrays, n, loss):
    content = RecordDict({"arrays": ArrayRecord({f"layer{i}": Array(a) for i, a in enumerate(arrays)}),
                          "metrics": MetricRecord({"num-examples": n, "loss": loss})})
    meta = Metadata(run_id=1, message_id=f"m{j}", src_node_id=j + 10, dst_node_id=0, reply_to_message_id=f"q{j}",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=content, metadata=meta)


def test_message_fedavg_equals_flowers():
    rng = np.random.default_rng(0)
    theirs, ours = ms.FedAvg(), jkfl.MessageFedAvg()
    for r in range(1, 3):
        replies = [_reply(j, [rng.standard_normal((30, 20)).astype(np.float32),
                              rng.standard_normal(20).astype(np.float32)], int(rng.integers(1, 100)), float(j))
                   for j in range(4)]
        a_t, m_t = theirs.aggregate_train(r, replies)
        a_o, m_o = ours.aggregate_train(r, replies)
        assert dict(m_o) == pytest.approx(dict(m_t))
        assert list(a_o.keys()) == list(a_t.keys())
        for k in a_t:
            assert type(a_o[k].data) is bytes
            np.testing.assert_allclose(a_o[k].numpy(), a_t[k].numpy(), rtol=1e-6, atol=1e-7)
    assert ours.aggregate_train(3, []) == (None, None)


def _round_equals_flowers(theirs, ours, r, glob, rng, atol):
    """One round of 4 replies near ``glob`` through both strategies: equal models; returns Flower's (float32)."""
    replies = [_reply(j, [(a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32) for a in glob],
                      int(rng.integers(1, 100)), 0.0) for j in range(4)]
    a_t, _ = theirs.aggregate_train(r, replies)
    a_o, _ = ours.aggregate_train(r, replies)
    for k in a_t:
        np.testing.assert_allclose(a_o[k].numpy(), a_t[k].numpy().astype(np.float32), rtol=0, atol=atol)
    return [a_t[f"layer{i}"].numpy().astype(np.float32) for i in range(2)]


@pytest.mark.parametrize("name", ["FedAdam", "FedYogi", "FedAdagrad"])
def test_message_fedopt_equals_flowers_over_rounds(name):
    rng = np.random.default_rng(1)
    x0 = [rng.standard_normal((30, 20)).astype(np.float32), rng.standard_normal(20).astype(np.float32)]
    kw = {"eta": 0.01, "tau": 1e-3}
    theirs, ours = getattr(ms, name)(**kw), getattr(jkfl, "Message" + name)(**kw)
    glob = x0
    for r in range(1, 4):
        for s in (theirs, ours):  # what configure_train records: the arrays sent this round
            s.current_arrays = {f"layer{i}": a for i, a in enumerate(glob)}
        glob = _round_equals_flowers(theirs, ours, r, glob, rng, atol=3e-6)


@pytest.mark.parametrize("name", ["FedMedian", "FedTrimmedAvg"])
def test_message_robust_strategies_equal_flowers(name):
    def replies():  # rebuilt for each strategy: Flower's versions pop the arrays out of the replies
        r = np.random.default_rng(7)
        return [_reply(j, [r.standard_normal((30, 20)).astype(np.float32), r.standard_normal(20).astype(np.float32)],
                       10 * (j + 1), float(j)) for j in range(5)]

    kw = {"beta": 0.2} if name == "FedTrimmedAvg" else {}
    a_t, m_t = getattr(ms, name)(**kw).aggregate_train(1, replies())
    mine = replies()
    a_o, m_o = getattr(jkfl, "Message" + name)(**kw).aggregate_train(1, mine)
    assert dict(m_o) == pytest.approx(dict(m_t))
    for k in a_t:
        np.testing.assert_allclose(a_o[k].numpy(), a_t[k].numpy().astype(np.float32), rtol=1e-6, atol=1e-7)
    assert all(len(next(iter(m.content.array_records.values()))) == 2 for m in mine)  # ours left them intact


def test_message_fedavgm_steps_from_its_own_last_record_in_place(monkeypatch):
    """MessageFedAvgM read its model back from current_arrays each round (the record its last step returned) with two
    copies, then the reset copied and checked it a third time. It is read in place now, and where it is the state's
    own model not copied in at all: the same bits as a strategy whose current_arrays is replaced by a copy each
    round (which is copied in, as before)."""
    flats = []
    flat = jk.Aggregator._flat
    monkeypatch.setattr(jk.Aggregator, "_flat", lambda self, *a: flats.append(self) or flat(self, *a))
    rng = np.random.default_rng(4)
    x0 = [rng.standard_normal((30, 20)).astype(np.float32), rng.standard_normal(20).astype(np.float32)]
    kw = {"server_learning_rate": 0.8, "server_momentum": 0.9}
    own, copied = jkfl.MessageFedAvgM(**kw), jkfl.MessageFedAvgM(**kw)
    for s in (own, copied):
        s.current_arrays = ArrayRecord({f"layer{i}": Array(a) for i, a in enumerate(x0)})
    for r in range(1, 5):
        replies = [_reply(j, [(a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32) for a in x0],
                          int(rng.integers(1, 100)), 0.0) for j in range(4)]
        copied.current_arrays = ArrayRecord({k: Array(a.numpy()) for k, a in copied.current_arrays.items()})
        flats.clear()
        a_own, a_copied = own.aggregate_train(r, replies)[0], copied.aggregate_train(r, replies)[0]
        for k in a_copied:
            np.testing.assert_array_equal(a_own[k].numpy(), a_copied[k].numpy())
        assert len([s for s in flats if s is own._jk.agg]) == (0 if r > 1 else 1)
        assert len([s for s in flats if s is copied._jk.agg]) == 1


def test_message_fedavgm_takes_a_current_record_whose_bytes_np_load_reads():
    """A current_arrays Array whose .npy bytes carry trailing bytes (which np.load, and so Flower's FedAvgM, reads)
    was refused once the record was read in place (LayoutMismatch naming '<base>'): such an Array is read as Flower
    reads it, and the round equals Flower's (found in review)."""
    rng = np.random.default_rng(9)
    x0 = [rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)]
    kw = {"server_learning_rate": 0.8, "server_momentum": 0.9}
    theirs, ours = ms.FedAvgM(**kw), jkfl.MessageFedAvgM(**kw)

    def padded(a):
        arr = Array(a)
        return Array(dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=arr.data + b"\0" * 8)
    for s in (theirs, ours):
        s.current_arrays = ArrayRecord({f"layer{i}": padded(a) for i, a in enumerate(x0)})
    replies = [_reply(j, [(a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32) for a in x0],
                      int(rng.integers(1, 100)), 0.0) for j in range(3)]
    a_t, a_o = theirs.aggregate_train(1, replies)[0], ours.aggregate_train(1, replies)[0]
    for k in a_t:
        np.testing.assert_allclose(a_o[k].numpy(), a_t[k].numpy(), rtol=0, atol=2e-6)


def test_message_fedavgm_equals_flowers_over_rounds():
    rng = np.random.default_rng(3)
    x0 = [rng.standard_normal((30, 20)).astype(np.float32), rng.standard_normal(20).astype(np.float32)]
    kw = {"server_learning_rate": 0.8, "server_momentum": 0.9}
    theirs, ours = ms.FedAvgM(**kw), jkfl.MessageFedAvgM(**kw)
    record = ArrayRecord({f"layer{i}": Array(a) for i, a in enumerate(x0)})
    theirs.current_arrays = ours.current_arrays = record  # what configure_train records on round 1
    glob = x0
    for r in range(1, 4):
        replies = [_reply(j, [(a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32) for a in glob],
                          int(rng.integers(1, 100)), 0.0) for j in range(4)]
        a_t, _ = theirs.aggregate_train(r, replies)
        a_o, _ = ours.aggregate_train(r, replies)
        for k in a_t:
            np.testing.assert_allclose(a_o[k].numpy(), a_t[k].numpy(), rtol=0, atol=2e-5)
        glob = [a_t[f"layer{i}"].numpy() for i in range(2)]


@pytest.mark.parametrize("name,kw", [("Krum", {"num_malicious_nodes": 1}),
                                     ("MultiKrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 3})])
def test_message_krum_equals_flowers_with_metrics_of_the_selected(name, kw):
    """Well-separated scores (an honest cluster at different distances, one attacker far out): the same selection,
    the same weighted average, and the metrics averaged over the selected replies only, as Flower does."""
    def replies():
        r = np.random.default_rng(11)
        center = [r.standard_normal((30, 20)).astype(np.float32), r.standard_normal(20).astype(np.float32)]
        out = []
        for j in range(6):
            spread = 0.01 * (j + 1) if j < 5 else 50.0  # j = 5: the attacker
            out.append(_reply(j, [(c + spread * r.standard_normal(c.shape)).astype(np.float32) for c in center],
                              10 * (j + 1), float(j)))
        return out

    a_t, m_t = getattr(ms, name)(**kw).aggregate_train(1, replies())
    ours = getattr(jkfl, "Message" + name)(**kw)
    mine = replies()
    a_o, m_o = ours.aggregate_train(1, mine)
    assert dict(m_o) == pytest.approx(dict(m_t))
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
    every = aggregate_metricrecords([m.content for m in replies()], "num-examples")
    assert dict(m_o) != pytest.approx(dict(every))  # not the metrics of all six replies
    assert ours._jk.last_parties[5] not in ours._jk.algorithm.selected  # the attacker's
    for k in a_t:
        np.testing.assert_allclose(a_o[k].numpy(), a_t[k].numpy().astype(np.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["FedAdam", "FedYogi", "FedAdagrad", "FedAvgM"])
def test_message_server_optimizers_step_from_the_arrays_flower_reads(name):
    """Flower's FedOpt steps from ``current_arrays``, which its configure_train sets to the arrays it sends, each
    round; its FedAvgM from ``current_arrays`` too, set by configure_train once and by each step after (a caller may
    assign it). A caller that sends other arrays in round 2 (a restored checkpoint, say) gets Flower's result; ours
    went on from its own last model."""
    rng = np.random.default_rng(2)
    x0 = [rng.standard_normal((30, 20)).astype(np.float32), rng.standard_normal(20).astype(np.float32)]
    kw = {"server_learning_rate": 0.8, "server_momentum": 0.9} if name == "FedAvgM" else {"eta": 0.01, "tau": 1e-3}
    # fraction_train=0: configure_train records the arrays and samples no node (no Grid needed)
    kw["fraction_train"] = 0.0
    theirs, ours = getattr(ms, name)(**kw), getattr(jkfl, "Message" + name)(**kw)
    glob = x0
    for r in range(1, 4):
        if r == 2:
            glob = [(a + 0.5 * rng.standard_normal(a.shape)).astype(np.float32) for a in x0]
        record = ArrayRecord({f"layer{i}": Array(a) for i, a in enumerate(glob)})
        for s in (theirs, ours):
            assert s.configure_train(r, record, ConfigRecord(), None) == []
            if name == "FedAvgM" and r == 2:
                s.current_arrays = record
        glob = _round_equals_flowers(theirs, ours, r, glob, rng, atol=2e-5)


def _line_replies(k, f, zero):
    """k replies on a line at 0, 1, 3, 7 steps (gaps 1, 2, 4), in a random order, the one at ``zero`` of weight 0:
    well-separated Krum scores, but for the closest pair's when a score has one neighbour (k - f - 2 <= 1): those
    two always share the lowest score, an exact tie. Rebuilt for each strategy."""
    rng = np.random.default_rng(10 * k + f)
    center = [rng.standard_normal((30, 20)).astype(np.float32), rng.standard_normal(20).astype(np.float32)]
    step = [rng.standard_normal(c.shape).astype(np.float32) for c in center]
    return [_reply(j, [(c + p * d).astype(np.float32) for c, d in zip(center, step)],
                   0 if j == zero else 10 * (j + 1), float(j)) for j, p in enumerate(rng.permutation([0, 1, 3, 7][:k]))]


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("f", [0, 1, 2])
def test_message_krum_with_few_replies_and_zero_weight_equals_flowers(k, f):
    """Flower's Krum and MultiKrum run with any k (max(1, k - f - 2) neighbours), score replies of weight 0 (they
    weigh 0 in the average), and keep every reply when num_nodes_to_select > k; so do ours (they raised
    TooFewUpdates below k = 2f + 3, left weight 0 out, and refused m > k). Krum (one reply) only where its score is
    the lowest alone (k = 4, f = 0: two neighbours); see the next test for the tie. Where Krum selects the reply of
    weight 0, Flower divides by the selection's total weight (ZeroDivisionError); so does ours (in the metrics,
    averaged by Flower's own function)."""
    krum = k - f - 2 >= 2
    cases = [("MultiKrum", {"num_nodes_to_select": 2}), ("MultiKrum", {"num_nodes_to_select": 5})] + (
        [("Krum", {})] if krum else [])
    raised = 0
    for name, kw in cases:
        kw["num_malicious_nodes"] = f
        for zero in range(k):
            try:
                a_t, m_t = getattr(ms, name)(**kw).aggregate_train(1, _line_replies(k, f, zero))
            except ZeroDivisionError:
                with pytest.raises(ZeroDivisionError):
                    getattr(jkfl, "Message" + name)(**kw).aggregate_train(1, _line_replies(k, f, zero))
                raised += 1
                continue
            a_o, m_o = getattr(jkfl, "Message" + name)(**kw).aggregate_train(1, _line_replies(k, f, zero))
            assert dict(m_o) == pytest.approx(dict(m_t))
            for key in a_t:
                np.testing.assert_allclose(a_o[key].numpy(), a_t[key].numpy(), rtol=1e-6, atol=1e-6)
    assert raised == krum  # Krum selects one reply: once, the reply of weight 0


@pytest.mark.parametrize("k,f", [(2, 0), (3, 1), (4, 2)])
def test_message_krum_tie_goes_to_the_earlier_reply(k, f):
    """With one neighbour the two closest replies share the lowest score exactly. Flower's Message Krum takes
    whichever ``np.argsort`` (not stable) puts first; ours, like Flower's strategy-API Krum (``np.argmin``), the
    earlier one. Either way it is one of the pair."""
    contents = [m.content for m in _line_replies(k, f, None)]
    flat = np.stack([np.concatenate([a.ravel() for a in c["arrays"].to_numpy_ndarrays()]) for c in contents])
    d = ((flat[:, None, :].astype(np.float64) - flat[None, :, :]) ** 2).sum(-1) + np.diag(np.full(k, np.inf))
    pair = sorted(np.unravel_index(np.argmin(d), d.shape))
    theirs = ms.multikrum.select_multikrum(contents, f, 1)[0]
    assert any(theirs is contents[j] for j in pair)
    ours = jkfl.MessageKrum(num_malicious_nodes=f)
    a_o, _ = ours.aggregate_train(1, _line_replies(k, f, None))
    assert ours._jk.algorithm.selected == (ours._jk.last_parties[pair[0]],)
    for key, a in contents[pair[0]]["arrays"].items():
        np.testing.assert_array_equal(a_o[key].numpy(), a.numpy())


def _named_reply(j, named, n):
    content = RecordDict({"arrays": ArrayRecord({k: Array(a) for k, a in named}),
                          "metrics": MetricRecord({"num-examples": n})})
    meta = Metadata(run_id=1, message_id=f"m{j}", src_node_id=j + 10, dst_node_id=0, reply_to_message_id=f"q{j}",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=content, metadata=meta)


def test_message_optimizers_match_arrays_by_name_whatever_the_replies_key_order():
    """A round whose replies list the keys in another order than the first round's: the moments stay with their
    arrays (they were kept by position and went to the other layer)."""
    glob = {"a": np.zeros(5, np.float32), "b": np.zeros(5, np.float32)}
    theirs, ours = ms.FedAdam(eta=0.1, tau=1e-3), jkfl.MessageFedAdam(eta=0.1, tau=1e-3)
    for r, order in ((1, ["b", "a"]), (2, ["a", "b"]), (3, ["b", "a"])):
        for s in (theirs, ours):
            s.current_arrays = {k: v.copy() for k, v in glob.items()}  # as configure_train records them
        step = {"a": 1.0, "b": -1.0}
        replies = [_named_reply(j, [(k, glob[k] + step[k]) for k in order], 10) for j in range(3)]
        t, _ = theirs.aggregate_train(r, replies)
        o, _ = ours.aggregate_train(r, replies)
        for k in glob:
            np.testing.assert_allclose(o[k].numpy(), t[k].numpy(), rtol=1e-6)
        # and in Flower's order (current_arrays'): callers load records by position (it was the first round's)
        assert list(o.keys()) == list(t.keys())
        glob = {k: t[k].numpy().astype(np.float32) for k in glob}


def test_message_fedavg_lists_arrays_in_the_rounds_first_reply_order():
    """As Flower's: a round whose replies list their keys in another order than the first round's returns them in
    its first reply's order (the first round's order was kept for good)."""
    theirs, ours = ms.FedAvg(), jkfl.MessageFedAvg()
    for r, order in ((1, ["w", "b"]), (2, ["b", "w"])):
        shapes = {"w": (3, 2), "b": (2,)}
        replies = [_named_reply(j, [(k, np.full(shapes[k], j, np.float32)) for k in order], 10) for j in range(2)]
        t, _ = theirs.aggregate_train(r, replies)
        o, _ = ours.aggregate_train(r, replies)
        assert list(o.keys()) == list(t.keys()) == order
        assert [a.shape for a in o.to_numpy_ndarrays()] == [a.shape for a in t.to_numpy_ndarrays()]


def test_message_errors_name_the_node_and_the_array():
    import jitkernels as jk

    good = [("conv.weight", np.ones((4, 3), np.float32)), ("conv.bias", np.ones(3, np.float32))]
    bad = [("conv.weight", np.ones((3, 3), np.float32)), ("conv.bias", np.ones(3, np.float32))]
    ours = jkfl.MessageFedAvg(accept_failures=False)  # (by default such a reply is left out: see below)
    ours.aggregate_train(1, [_named_reply(0, good, 10), _named_reply(1, good, 10)])
    with pytest.raises(jk.LayoutMismatch, match="party 'node-11', leaf 'conv.weight'"):
        ours.aggregate_train(2, [_named_reply(0, good, 10), _named_reply(1, bad, 10)])
    nan = [good[0], ("conv.bias", np.array([1, np.nan, 1], np.float32))]
    with pytest.raises(jk.NonFiniteUpdate, match="party 'node-11'.*leaf 'conv.bias'"):
        ours.aggregate_train(3, [_named_reply(0, good, 10), _named_reply(1, nan, 10)])


def test_a_first_round_whose_step_is_refused_leaves_the_next_round_working():
    """Round 1's step takes a float16 model past 65504 (refused by name): round 2 aggregates by the same names
    (it failed with a TypeError: the names were set only after a successful first round)."""
    import jitkernels as jk

    s = jkfl.MessageFedAdam(eta=1e5, tau=1e-3)
    s.current_arrays = {"layer0": np.zeros(5, np.float16)}
    with pytest.raises(jk.ValueOutOfRange, match="leaf 'layer0'"):
        s.aggregate_train(1, [_named_reply(j, [("layer0", np.full(5, 0.5 * (j + 1), np.float16))], 10)
                              for j in range(3)])
    out, _ = s.aggregate_train(2, [_named_reply(j, [("layer0", np.full(5, 1e-3 * (j + 1), np.float16))], 10)
                                   for j in range(3)])
    assert np.isfinite(out["layer0"].numpy()).all()


def _current_arrays(name, arrays):
    """``arrays`` as Flower's configure_train records them: its FedOpt keeps numpy arrays by name, its FedAvgM the
    ArrayRecord."""
    return ArrayRecord({k: Array(a) for k, a in arrays.items()}) if name == "FedAvgM" else dict(arrays)


@pytest.mark.parametrize("name, kw, change", [
    ("FedAdam", {"eta": 0.01, "tau": 1e-3}, {"eta": 0.001, "beta_2": 0.9}),
    ("FedAdagrad", {"eta": 0.01, "tau": 1e-3}, {"eta": 0.03}),
    ("FedAvgM", {"server_learning_rate": 0.8, "server_momentum": 0.9},
     {"server_learning_rate": 0.3, "server_momentum": 0.5}),
    ("FedTrimmedAvg", {"beta": 0.2}, {"beta": 0.0}),
    ("MultiKrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 3}, {"num_nodes_to_select": 1}),
])
def test_message_hyperparameters_set_between_rounds_are_read_as_flower_reads_them(name, kw, change):
    """Flower reads a strategy's hyperparameters at each aggregate_train (a learning-rate schedule sets them between
    rounds); ours built the algorithm once from the constructor's and ignored the change (MessageFedAdam's eta
    0.01 -> 0.001: 0.08 off). Set before round 2; round 3 checks that the moments and round counter carried."""
    rng = np.random.default_rng(4)
    glob = [rng.standard_normal((30, 20)).astype(np.float32), rng.standard_normal(20).astype(np.float32)]
    theirs, ours = getattr(ms, name)(**kw), getattr(jkfl, "Message" + name)(**kw)
    for r in range(1, 4):
        if r == 2:
            for s in (theirs, ours):
                for k, v in change.items():
                    setattr(s, k, v)
        if name != "FedAvgM" or r == 1:  # configure_train records them (FedAvgM: once; each step stores its own)
            for s in (theirs, ours):
                s.current_arrays = _current_arrays(name, {f"layer{i}": a for i, a in enumerate(glob)})
        seed = int(rng.integers(1 << 30))

        def replies():  # rebuilt for each strategy: Flower's robust ones pop the arrays out of the replies
            rr = np.random.default_rng(seed)
            return [_reply(j, [(a + 0.05 * (j + 1) * rr.standard_normal(a.shape)).astype(np.float32) for a in glob],
                           10 * (j + 1), 0.0) for j in range(5)]

        a_t, _ = theirs.aggregate_train(r, replies())
        a_o, _ = ours.aggregate_train(r, replies())
        for k in a_t:
            np.testing.assert_allclose(a_o[k].numpy(), a_t[k].numpy(), rtol=0, atol=2e-5)
        glob = [a_t[f"layer{i}"].numpy().astype(np.float32) for i in range(2)]


@pytest.mark.parametrize("name", ["FedAdam", "FedYogi", "FedAdagrad", "FedAvgM"])
def test_message_optimizers_refuse_current_arrays_whose_keys_differ_from_the_replies(name):
    """Flower refuses a current_arrays whose keys differ from the replies' (AggregationError; its FedAvgM's strict
    zip, a ValueError). Ours dropped an array found only in current_arrays from the new model, and raised a bare
    KeyError for one only in the replies; now LayoutMismatch names the array."""
    from flwr.serverapp.exception import AggregationError

    import jitkernels as jk

    kw = {"server_learning_rate": 0.8, "server_momentum": 0.9} if name == "FedAvgM" else {}
    model = {"a": np.ones(4, np.float32), "b": np.zeros(3, np.float32)}
    for current, leaf, what in (({**model, "c": np.zeros(2, np.float32)}, "c", "in the strategy's current_arrays only"),
                                ({"a": model["a"]}, "b", "missing from the strategy's current_arrays")):
        theirs, ours = getattr(ms, name)(**kw), getattr(jkfl, "Message" + name)(**kw)
        for s in (theirs, ours):
            s.current_arrays = _current_arrays(name, current)
        replies = [_named_reply(j, [(k, v + j) for k, v in model.items()], 10) for j in range(3)]
        with pytest.raises((AggregationError, ValueError)):
            theirs.aggregate_train(1, replies)
        with pytest.raises(jk.LayoutMismatch, match=f"party '<base>', leaf '{leaf}': {what}"):
            ours.aggregate_train(1, replies)


def test_message_api_errors_name_the_array_by_its_key():
    """Two refusals named an array by its place in the first reply's order ('array 1'), which need not be where it
    sits in the reply at fault: a dtype that cannot be averaged, and a value past the model's dtype."""
    good = [_reply(j, [np.ones((3, 4), np.float32), np.ones(4, np.float32)], 10, 0.0) for j in range(3)]
    for bad, err, what in ((np.ones(4, np.complex64), jk.LayoutMismatch, "complex64"),
                           (np.full(4, 1e300), jk.ValueOutOfRange, "1e\\+300")):
        strategy = jkfl.MessageFedAvg(backend="numpy", accept_failures=False)
        strategy.aggregate_train(1, good)
        with pytest.raises(err, match=f"leaf 'layer1'.*{what}"):
            strategy.aggregate_train(2, good + [_reply(9, [np.ones((3, 4), np.float32), bad], 5, 0.0)])


@pytest.mark.parametrize("name,kw", [("FedAvg", {}), ("FedMedian", {}), ("Krum", {"num_malicious_nodes": 1}),
                                     ("FedAdam", {"eta": 0.01, "tau": 1e-3})])
def test_a_reply_refused_for_what_it_is_is_left_out_not_the_round(name, kw):
    """One node's NaN or inf, negative or NaN sample count, shape the model lacks, truncated bytes or other
    serialization raised from aggregate_train, and Flower's Strategy.start does not catch it: the run ended (where
    Flower's Krum had sorted it out, and its FedAvg averaged the NaN in). As the strategy-API strategies with
    accept_failures=True (their default), such a reply is logged and left out, the round aggregates the others and
    their metrics; accept_failures=False raises, naming the node; a round with every reply left out returns
    (None, None), as one with no valid replies."""
    rng = np.random.default_rng(5)
    x0 = [rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)]

    def good():
        r = np.random.default_rng(6)
        return [_reply(j, [(a + 0.1 * r.standard_normal(a.shape)).astype(np.float32) for a in x0], 10 * (j + 1),
                       float(j)) for j in range(5)]

    def strategy(**extra):  # one whose layout a first round of good replies fixed
        s = getattr(jkfl, "Message" + name)(**kw, **extra)
        if name == "FedAdam":
            s.current_arrays = {f"layer{i}": a for i, a in enumerate(x0)}
        s.aggregate_train(1, good())
        return s

    def corrupt(stype="numpy.ndarray", cut=0):
        reply = _reply(9, x0, 10, 0.0)
        a = Array(x0[0])
        reply.content["arrays"]["layer0"] = Array(dtype=a.dtype, shape=a.shape, stype=stype,
                                                  data=a.data[:len(a.data) - cut])
        return reply
    bad = {"nan": _reply(9, [np.full_like(x0[0], np.nan), x0[1]], 10, 0.0),
           "inf": _reply(9, [x0[0], np.full_like(x0[1], np.inf)], 10, 0.0),
           "negative count": _reply(9, x0, -5, 0.0), "nan count": _reply(9, x0, float("nan"), 0.0),
           "shape": _reply(9, [np.ones((3, 3), np.float32), x0[1]], 10, 0.0),
           "truncated": corrupt(cut=4), "serialization": corrupt(stype="torch")}
    want, want_metrics = strategy().aggregate_train(2, good())
    for what, reply in bad.items():
        got, got_metrics = strategy().aggregate_train(2, good()[:2] + [reply] + good()[2:])
        assert dict(got_metrics) == pytest.approx(dict(want_metrics)), what
        for k in want:
            np.testing.assert_array_equal(got[k].numpy(), want[k].numpy(), err_msg=what)
        with pytest.raises(jk.AggregationError, match="party 'node-19'"):
            strategy(accept_failures=False).aggregate_train(2, good()[:2] + [reply] + good()[2:])
    assert strategy().aggregate_train(2, [bad["nan"]]) == (None, None)
    assert strategy().aggregate_train(2, [bad["truncated"]]) == (None, None)  # (unreadable bytes: that node's fault)
    with pytest.raises(jk.LayoutMismatch, match="party 'node-19'"):  # all of them: a model changed, no node's fault
        strategy().aggregate_train(2, [bad["shape"]])
    with pytest.raises(jk.LayoutMismatch, match="party 'node-19'"):  # (the other's count refused before its shape)
        strategy().aggregate_train(2, [bad["shape"], _reply(8, [np.ones((3, 3), np.float32), x0[1]], -5, 0.0)])
    renamed = [_named_reply(j, [("fc.w", x0[0]), ("fc.b", x0[1])], 10) for j in range(3)]  # (a second review)
    with pytest.raises(jk.LayoutMismatch, match="party 'node-10', leaf 'layer0': missing from the reply"):
        strategy().aggregate_train(2, renamed)
    with pytest.raises(TypeError, match="accept_failures must be True or False"):
        getattr(jkfl, "Message" + name)(**kw, accept_failures="no")


def test_the_record_takes_its_order_from_the_first_reply_kept():
    """Without a model to follow (FedAvg), the returned record lists the arrays in the round's first reply's order,
    as Flower does; when that reply was left out, it took the order of a reply never aggregated (callers that load
    the record by position put arrays into other layers)."""
    good = [("layer0", np.ones((3, 2), np.float32)), ("layer1", np.ones(2, np.float32))]
    nan_reversed = [("layer1", np.full(2, np.nan, np.float32)), ("layer0", np.ones((3, 2), np.float32))]
    s = jkfl.MessageFedAvg()
    s.aggregate_train(1, [_named_reply(j, good, 10) for j in range(2)])
    out, _ = s.aggregate_train(2, [_named_reply(5, nan_reversed, 10)] + [_named_reply(j, good, 10) for j in range(2)])
    assert list(out.keys()) == ["layer0", "layer1"]

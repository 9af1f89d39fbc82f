"""jitkernels' strategy for Flower's Message API (``flwr.serverapp.strategy``) against Flower's own on the same reply
Messages: equal within float32 rounding; the new ArrayRecord's Arrays carry our bytes (no copy out)."""

import time

import numpy as np
import pytest

pytest.importorskip("flwr", reason="Flower (flwr) is a test dependency: pip install -e '.[test]'")
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import strategy as ms  # noqa: E402

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
        replies = [_reply(j, [rng.standard_normal((30, 20)).astype(np.float32), rng.standard_normal(20).astype(np.float32)],
                          int(rng.integers(1, 100)), float(j)) for j in range(4)]
        a_t, m_t = theirs.aggregate_train(r, replies)
        a_o, m_o = ours.aggregate_train(r, replies)
        assert dict(m_o) == pytest.approx(dict(m_t))
        assert list(a_o.keys()) == list(a_t.keys())
        for k in a_t:
            assert type(a_o[k].data) is bytes
            np.testing.assert_allclose(a_o[k].numpy(), a_t[k].numpy(), rtol=1e-6, atol=1e-7)
    assert ours.aggregate_train(3, []) == (None, None)


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
        replies = [_reply(j, [(a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32) for a in glob],
                          int(rng.integers(1, 100)), 0.0) for j in range(4)]
        a_t, _ = theirs.aggregate_train(r, replies)
        a_o, _ = ours.aggregate_train(r, replies)
        for k in a_t:
            np.testing.assert_allclose(a_o[k].numpy(), a_t[k].numpy().astype(np.float32), rtol=0, atol=3e-6)
        glob = [a_t[f"layer{i}"].numpy().astype(np.float32) for i in range(2)]


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
    assert "reply-5" not in ours._jk.algorithm.selected
    for k in a_t:
        np.testing.assert_allclose(a_o[k].numpy(), a_t[k].numpy().astype(np.float32), rtol=1e-6, atol=1e-6)

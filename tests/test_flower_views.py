"""Zero-copy views of Flower's serialized parameters: equal to Flower's own deserialization, read in place, and
every malformed or unsafe buffer refused with the party and array named (nothing is unpickled)."""

import io

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jitkernels as jk
from jitkernels.integrations.flower import ndarray_view, ndarrays_from_parameters

flwr = pytest.importorskip("flwr", reason="Flower (flwr) is a test dependency: pip install -e '.[test]'")
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402

DTYPES = ["float64", "float32", "float16", "int64", "int32", "int8", "uint8", "bool", "complex64"]


@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(DTYPES), ndim=st.integers(0, 3),
       fortran=st.booleans(), big_endian=st.booleans())
def test_views_equal_flowers_deserialization(seed, dtype, ndim, fortran, big_endian):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(0, 5, ndim))
    a = (rng.standard_normal(shape) * 100).astype(dtype)
    if big_endian:
        a = a.astype(a.dtype.newbyteorder(">"))
    if fortran:
        a = np.asfortranarray(a)
    params = ndarrays_to_parameters([a])
    (view,), (theirs,) = ndarrays_from_parameters(params), parameters_to_ndarrays(params)
    assert view.dtype == theirs.dtype and view.shape == theirs.shape
    assert view.tobytes() == theirs.tobytes()
    assert not view.flags.writeable
    if a.size:
        assert np.shares_memory(view, np.frombuffer(params.tensors[0], np.uint8))  # no copy


def test_malformed_and_unsafe_buffers_are_refused():
    good = ndarrays_to_parameters([np.ones((3, 4), np.float32)]).tensors[0]
    for bad, what in [(good[:-1], "data bytes"), (b"not numpy", "not a .npy"), (good[:9], "not a .npy"),
                      (good[:12], "truncated|bad .npy header")]:
        with pytest.raises(jk.LayoutMismatch, match=what) as e:
            ndarray_view(bad, party="p7", index=2)
        assert e.value.party == "p7" and e.value.leaf == "array 2"
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(jk.LayoutMismatch, match="unpickling"):
        ndarray_view(buf.getvalue(), party="evil", index=0)
    with pytest.raises(jk.LayoutMismatch, match="expected flwr Parameters"):  # (a bare AttributeError before)
        ndarrays_from_parameters(None, party="evil")

    def npy(header: str, data: bytes = b"") -> bytes:
        h = header.encode().ljust(118) + b"\n"
        return b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h + data
    # a zero-size dtype matched any shape with 0 data bytes, then frombuffer raised; a bool dimension is an int
    for bad, what in [(npy("{'descr': '|V0', 'fortran_order': False, 'shape': (1000000000000,), }"), "holds no bytes"),
                      (npy("{'descr': '<f4', 'fortran_order': False, 'shape': (True,), }", b"\0" * 4), "bad shape"),
                      (None, "expected the bytes"), ("text", "expected the bytes")]:
        with pytest.raises(jk.LayoutMismatch, match=what):
            ndarray_view(bad, party="evil", index=0)


@pytest.mark.parametrize("major, shape, data", [
    (1, "(" + "-" * 3000 + "4,)", 16),  # literal_eval: RecursionError
    (3, "(" + "+" * 9000 + "4,)", 16),  # literal_eval: MemoryError
    (1, "(0, 9223372036854775807, 9223372036854775807)", 0),  # zero bytes, a shape no index holds
    (1, "(" + "1," * 100 + ")", 4),  # past numpy's 64 dimensions
    (1, "(4,), ", 16),  # an unclosed brace: tokenize's TokenError
    (1, "(4,), b'x': 1", 16),  # a bytes key, sorted against str keys: TypeError
], ids=["minus-chain", "plus-chain", "no-index-holds", "100-dims", "unclosed", "bytes-key"])
def test_hostile_headers_are_layout_mismatch(major, shape, data):
    """A client's crafted header reached the strategy as a RecursionError, a MemoryError, a plain ValueError that
    named no party, tokenize's TokenError or a TypeError: a server that drops the client on an AggregationError lost
    the round."""
    header = ("{'descr': '<f4', 'fortran_order': False, 'shape': " + shape +
              ("" if shape.endswith(", ") else "}") + "\n").encode()
    size = len(header).to_bytes(2 if major == 1 else 4, "little")
    blob = b"\x93NUMPY" + bytes([major, 0]) + size + header + b"\0" * data
    with pytest.raises(jk.LayoutMismatch) as e:
        ndarray_view(blob, party="evil", index=1)
    assert e.value.party == "evil" and e.value.leaf == "array 1" and len(str(e.value)) < 400


def test_views_fold_in_place():
    rng = np.random.default_rng(0)
    ups = [[rng.standard_normal((30, 20)).astype(np.float32), rng.standard_normal(20).astype(np.float32)]
           for _ in range(3)]
    agg = jk.Aggregator(ups[0], "fedavg")
    for j, u in enumerate(ups):
        agg.fold(ndarrays_from_parameters(ndarrays_to_parameters(u), party=j), weight=j + 1, party=j)
    got = agg.finalize()
    want = [sum((j + 1) * u[i].astype(np.float64) for j, u in enumerate(ups)) / 6 for i in range(2)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_buffers_that_are_not_flat_bytes_and_tensors_that_are_no_list_are_typed():
    """A strided memoryview raised a bare BufferError, a 2-D uint8 array of the bytes NotImplementedError, and
    Parameters whose tensors are None a bare TypeError (in-process clients can send them)."""
    from flwr.common import Parameters

    buf = io.BytesIO()
    np.save(buf, np.arange(6, dtype=np.float32))
    data = buf.getvalue()
    np.testing.assert_array_equal(ndarray_view(np.frombuffer(data, np.uint8).reshape(1, -1)), np.arange(6))
    strided = memoryview(np.frombuffer(data + data, np.uint8)[::2])
    with pytest.raises(jk.LayoutMismatch, match="not contiguous"):
        ndarray_view(strided, party="p", index=0)
    with pytest.raises(jk.LayoutMismatch, match="list of tensors"):
        ndarrays_from_parameters(Parameters(tensors=None, tensor_type="numpy.ndarray"), party="p")

"""The one host loop for batched calls (maskad_jax/common/batching.py), on hand-worked cases."""

import numpy as np

from maskad_jax.common.batching import iter_batched, row_batches, run_batched, split_batches


def test_row_batches_cut_in_order_and_pad_the_last_by_repeating_its_last_row():
    a, b = np.arange(10) * 10, np.arange(10)
    got = list(row_batches((a, None, b), 4, rows=[9, 0, 5, 1, 2, 3], pad=True))
    assert len(got) == 2
    (x, none, y), valid, host = got[1]
    assert none is None and host == {}
    np.testing.assert_array_equal(x, [20, 30, 30, 30])
    np.testing.assert_array_equal(y, [2, 3, 3, 3])
    np.testing.assert_array_equal(valid, [True, True, False, False])
    unpadded = [v for _, v, _ in row_batches((a,), 4)]
    assert [len(v) for v in unpadded] == [4, 4, 2] and all(v.all() for v in unpadded)


def test_run_batched_drops_padding_keeps_order_and_writes_into_one_allocation():
    calls = []

    def fn(x, y):
        calls.append(len(x))
        return {"sum": x + y, "twice": (2 * x, None)}

    rows = [3, 1, 4, 1, 5, 9, 2]
    a = np.arange(10, dtype=np.float32)
    for total in (None, len(rows)):
        res, host = run_batched(fn, row_batches((a, a), 3, rows=rows, pad=True), total=total)
        np.testing.assert_array_equal(res["sum"], 2 * a[rows])
        np.testing.assert_array_equal(res["twice"][0], 2 * a[rows])
        assert res["twice"][1] is None and host == {}
    assert set(calls) == {3}  # every call had the padded shape


def test_split_batches_keep_host_fields_and_streaming_passes_other_values_through():
    batches = [
        {"image": np.ones((2, 3)), "mask": np.array([7, 8]), "valid": np.array([1, 1])},
        {"image": np.ones((2, 3)), "mask": np.array([9, 0]), "valid": np.array([1, 0])},
    ]
    res, host = run_batched(lambda x: {"n": x.sum(axis=1)}, split_batches(batches, lambda b: (b["image"],), ("mask",)))
    np.testing.assert_array_equal(host["mask"], [7, 8, 9])
    np.testing.assert_array_equal(res["n"], [3, 3, 3])
    source = [((np.arange(2),), np.array([True, False]), {"note": "first", "rows": np.array([5, 6])})]
    ((out, kept, valid),) = list(iter_batched(lambda x: x * 2, source))
    assert kept["note"] == "first" and kept["rows"].tolist() == [5] and out.tolist() == [0]


def test_per_batch_results_and_an_empty_source():
    sums, _ = run_batched(lambda x: x.sum(), row_batches((np.arange(5.0),), 2), per_batch=True)
    assert [float(s) for s in sums] == [1.0, 5.0, 4.0]
    assert run_batched(lambda x: x, row_batches((np.zeros(0),), 2, rows=[])) == (None, {})

"""One cache shared by several Python threads: decodes run together under the read lock,
writes to other sequences are serialised, and every thread sees consistent results."""

import threading
import time

import numpy as np

import kvsieve

D = 64


def test_threads_decode_one_cache(rng):
    c = kvsieve.KvCache(2, 2, D, 16, 256, dtype="f16")
    seqs = []
    for n in (300, 45, 1000):
        s = c.create_sequence()
        c.append(s, n)
        for layer in range(2):
            c.write(s, layer, 0, *(rng.standard_normal((2, n, 2, D)).astype(np.float32)))
        seqs.append(s)
    qs = [rng.standard_normal((3, 8, D)).astype(np.float32) for _ in range(4)]
    expected = [c.decode(i % 2, seqs, q) for i, q in enumerate(qs)]

    errors = []
    start = threading.Barrier(6)

    def reader(i):
        try:
            start.wait()
            for _ in range(25):
                out, lse = c.decode(i % 2, seqs, qs[i])
                np.testing.assert_array_equal(out, expected[i][0])
                np.testing.assert_array_equal(lse, expected[i][1])
        except Exception as e:  # reported to the main thread below
            errors.append(e)

    def writer():
        # Grows and shrinks a sequence the readers never touch.
        try:
            start.wait()
            s = c.create_sequence()
            for _ in range(25):
                c.append(s, 40)
                for layer in range(2):
                    c.write(s, layer, 0, *(np.ones((2, 40, 2, D), np.float32)))
                c.truncate(s, 0)
            c.free_sequence(s)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=writer), threading.Thread(target=lambda: [start.wait(), [c.stats() for _ in range(200)]])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert c.sequences() == seqs
    c.check_invariants()


def test_gil_released_during_decode(rng):
    """While one long decode runs, another Python thread keeps executing bytecode: it records
    times that fall strictly inside the call."""
    hk, ps, pages, batch = 1, 16, 4096, 64  # 64 sequences of 65k tokens over the same pages
    k = rng.standard_normal((pages, ps, hk, D)).astype(np.float16)
    v = rng.standard_normal((pages, ps, hk, D)).astype(np.float16)
    indptr = np.arange(batch + 1, dtype=np.int32) * pages
    indices = np.tile(np.arange(pages, dtype=np.int32), batch)
    last = np.full(batch, ps, np.int32)
    q = rng.standard_normal((batch, 1, D)).astype(np.float32)

    started, done = threading.Event(), threading.Event()
    call = {}

    def decode_once():
        started.set()
        call["start"] = time.perf_counter()
        kvsieve.paged_decode(k, v, indptr, indices, last, q)
        call["end"] = time.perf_counter()
        done.set()

    t = threading.Thread(target=decode_once)
    t.start()
    started.wait()
    stamps = []
    while not done.is_set():
        stamps.append(time.perf_counter())
        done.wait(0.0005)
    t.join()
    # Were the GIL held across the call, no bytecode of this thread could run inside it.
    inside = sum(call["start"] < s < call["end"] for s in stamps)
    assert inside >= 3, (inside, call["end"] - call["start"])


def test_threads_policy_decode_while_another_sequence_streams(rng):
    """Policy-driven decodes (select + sparse attention under the read lock) run in several
    threads while a writer streams into another sequence and evicts under the same policy."""
    policy = kvsieve.Policy("sinks=4,window=64,pages=96")
    stream_policy = kvsieve.Policy("sinks=4,window=32")
    c = kvsieve.KvCache(2, 2, D, 16, 200, dtype="f32")
    seqs = []
    for n in (500, 130):
        s = c.create_sequence()
        c.append(s, n)
        for layer in range(2):
            c.write(s, layer, 0, *(rng.standard_normal((2, n, 2, D)).astype(np.float32)))
        seqs.append(s)
    qs = [rng.standard_normal((2, 4, D)).astype(np.float32) for _ in range(3)]
    expected = [c.decode_with_policy(i % 2, seqs, q, policy) for i, q in enumerate(qs)]
    errors = []
    start = threading.Barrier(4)

    def reader(i):
        try:
            start.wait()
            for _ in range(20):
                out, lse, sels = c.decode_with_policy(i % 2, seqs, qs[i], policy)
                np.testing.assert_array_equal(out, expected[i][0])
                np.testing.assert_array_equal(lse, expected[i][1])
                assert sels == expected[i][2]
        except Exception as e:  # reported to the main thread below
            errors.append(e)

    def streamer():
        try:
            start.wait()
            s = c.create_sequence()
            for _ in range(200):
                c.append(s, 1)
                t = c.seq_len(s) - 1
                for layer in range(2):
                    c.write(s, layer, t, *(np.ones((2, 1, 2, D), np.float32)))
                c.evict_for_policy(s, stream_policy)
            assert c.seq_len(s) <= 4 + 32 + 2 * 16
            c.free_sequence(s)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)] + [threading.Thread(target=streamer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    c.check_invariants()

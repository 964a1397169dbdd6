"""MQAR and text-corpus generators: structure checked element by element, determinism, bad input."""
import numpy as np
import pytest

from topkattn.training.tasks import IGNORE, MQAR, TextCorpus, stdlib_source_files


def test_mqar_structure():
    task = MQAR(vocab_size=40, seq_len=30, num_kv_pairs=5)
    x, y = task.batch(np.random.default_rng(3), 16)
    assert x.shape == (16, 30) and y.shape == (16, 30) and x.dtype == np.int64
    for b in range(16):
        keys, vals = x[b, 0:10:2], x[b, 1:10:2]
        assert len(set(keys.tolist())) == 5
        assert np.all((keys >= 1) & (keys < 20)) and np.all((vals >= 20) & (vals < 40))
        binding = dict(zip(keys.tolist(), vals.tolist()))
        scored = np.flatnonzero(y[b] != IGNORE)
        assert len(scored) == 5 and np.all(scored >= 10)
        assert sorted(x[b, scored].tolist()) == sorted(keys.tolist())  # each key queried once
        for t in scored:
            assert y[b, t] == binding[x[b, t]]
            if t + 1 < 30:
                assert x[b, t + 1] == y[b, t]          # the value follows its query (teacher forcing)
        rest = np.setdiff1d(np.arange(10, 30), np.concatenate([scored, scored + 1]))
        assert np.all(x[b, rest] == 0)                 # filler between queries


def test_mqar_deterministic_and_seed_dependent():
    task = MQAR(vocab_size=64, seq_len=64, num_kv_pairs=8)
    a = task.batch(7, 4)
    b = task.batch(np.random.default_rng(7), 4)
    c = task.batch(8, 4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_mqar_tightest_length_fills_every_slot():
    task = MQAR(vocab_size=16, seq_len=11, num_kv_pairs=3)      # 4N - 1
    x, y = task.batch(0, 3)
    assert np.count_nonzero(y != IGNORE) == 9
    np.testing.assert_array_equal(np.flatnonzero(y[0] != IGNORE), [6, 8, 10])


def test_mqar_bad_input():
    with pytest.raises(ValueError, match="num_kv_pairs must be at most"):
        MQAR(vocab_size=8, seq_len=64, num_kv_pairs=4)
    with pytest.raises(ValueError, match=r"seq_len must be at least 4 \* num_kv_pairs - 1 = 15 .*got 14"):
        MQAR(vocab_size=64, seq_len=14, num_kv_pairs=4)
    with pytest.raises(ValueError, match="batch_size"):
        MQAR().batch(0, 0)
    with pytest.raises(TypeError, match="rng"):
        MQAR().batch(None, 2)
    with pytest.raises(TypeError, match="rng"):
        MQAR().batch("seed", 2)


def test_text_corpus_split_and_windows(tmp_path):
    files = []
    for i in range(6):
        p = tmp_path / f"f{i}.py"
        p.write_bytes(bytes([65 + i]) * 40)
        files.append(str(p))
    corpus = TextCorpus(seq_len=8, heldout_every=3, files=files)
    # files 0 and 3 held out, 1 2 4 5 for training, joined with newlines
    assert set(corpus.heldout_data.tolist()) == {65, 68, 10}
    assert set(corpus.train_data.tolist()) == {66, 67, 69, 70, 10}
    assert corpus.train_data.size == 4 * 40 + 3
    x, y = corpus.batch(5, 10)
    assert x.shape == (10, 8)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    text = corpus.train_data.tobytes()
    for b in range(10):
        assert bytes(x[b].astype(np.uint8)) + bytes([y[b, -1]]) in text
    hx, hy = corpus.heldout(100)
    assert hx.shape == ((corpus.heldout_data.size - 1) // 8, 8)
    np.testing.assert_array_equal(hx.ravel(), corpus.heldout_data[:hx.size])
    np.testing.assert_array_equal(hy.ravel(), corpus.heldout_data[1:hx.size + 1])
    np.testing.assert_array_equal(corpus.batch(5, 10)[0], x)


def test_text_corpus_reads_stdlib():
    files = stdlib_source_files()
    assert any(f.endswith("os.py") for f in files)
    corpus = TextCorpus(seq_len=32, max_bytes=200_000)
    assert corpus.train_data.size == 200_000 and corpus.heldout_data.size > 1000
    with open(files[0], "rb") as f:                    # file 0 is held out and opens that split
        head = f.read(100)
    assert corpus.heldout_data[:len(head)].tobytes() == head


def test_text_corpus_too_short(tmp_path):
    short, long = tmp_path / "a.py", tmp_path / "b.py"
    short.write_bytes(b"abc")
    long.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match=r"held-out text has 3 bytes, fewer than seq_len \+ 1 = 9"):
        TextCorpus(seq_len=8, heldout_every=2, files=[str(short), str(long)])
    with pytest.raises(ValueError, match="training text has 3 bytes"):
        TextCorpus(seq_len=8, heldout_every=2, files=[str(long), str(short)])

"""The data pipeline: sources, the by-file split, deterministic batches, clear errors."""

import re

import numpy as np
import pytest

from experiments import data


def _corpus(tmp_path, n=60):
    for i in range(n):
        sub = tmp_path / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod{i}.py").write_text(f"def f{i}():\n    return {i}\n" * 3)
    (tmp_path / "notes.md").write_text("# notes\n" * 10)
    (tmp_path / "ignored.bin.txt.gz").write_bytes(b"\x00" * 10)
    return tmp_path


def test_default_corpus_is_the_stdlib_split_by_file_deterministically():
    a = data.load_tokens(None, max_files=80)
    data.load_tokens.cache_clear()
    b = data.load_tokens(None, max_files=80)
    assert a.vocab_size == 256 and a.train.dtype == np.uint8
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    assert 0 < a.val.size < a.train.size
    assert a.source.startswith("Python 3.") and a.source.endswith(" standard library, 80 files")
    assert "/" not in a.source  # no machine path in results


def test_folder_split_is_by_file_and_stable_under_reordering(tmp_path):
    root = _corpus(tmp_path)
    s = data.load_tokens(str(root))
    val_files = [p for p in sorted(root.rglob("*")) if p.is_file()
                 and data._is_val(p.relative_to(root).as_posix())]
    assert val_files, "the test corpus should put some file in validation"
    val_text = bytes(s.val).decode()
    train_text = bytes(s.train).decode()
    for f in val_files:
        assert f.read_text() in val_text
        # each file's text is unique (its index), so it appears in exactly one split
        if f.suffix == ".py":
            assert f.read_text() not in train_text
    # the .gz file is not a text source
    assert "\x00" not in train_text + val_text


def test_single_text_file_and_token_files(tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(256)) * 4)
    s = data.load_tokens(str(text))
    assert s.train.size + s.val.size == 1024 and s.vocab_size == 256
    npy = tmp_path / "tok.npy"
    np.save(npy, np.arange(1000, dtype=np.int32) % 300)
    s = data.load_tokens(str(npy))
    assert isinstance(s.train, np.memmap | np.ndarray) and s.vocab_size == 300
    assert s.train.size == 950 and s.val[0] == 950 % 300
    binf = tmp_path / "tok.bin"
    (np.arange(2000, dtype=np.uint16) * 7).tofile(binf)
    s = data.load_tokens(str(binf))
    assert isinstance(s.train, np.memmap) and s.vocab_size == 65536
    np.testing.assert_array_equal(s.train[:3], [0, 7, 14])


def test_saved_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [f"row number {i} of a tiny local dataset" for i in range(200)]
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "ds"))
    s = data.load_tokens(f"hf:{tmp_path / 'ds'}")
    joined = bytes(s.train).decode() + bytes(s.val).decode()
    assert all(r in joined for r in rows) and s.val.size > 0
    datasets.Dataset.from_dict({"body": rows}).save_to_disk(str(tmp_path / "nocol"))
    with pytest.raises(data.DataError, match="no 'text' column"):
        data.load_tokens(f"hf:{tmp_path / 'nocol'}")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "missing"), "no such file or folder"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "no .py, .txt or .md files"),
        (lambda p: (p / "short.txt").write_text("abc") and str(p / "short.txt"),
         "at least 64 tokens"),
        (lambda p: f"hf:{p / 'nothing'}", "hf:"),
    ],
)
def test_bad_sources_name_the_path_and_the_problem(tmp_path, make, message):
    source = make(tmp_path)
    with pytest.raises(data.DataError, match=message) as err:
        data.load_tokens(source)
    assert source.removeprefix("hf:") in str(err.value)


def test_batches_depend_only_on_seed_and_step():
    tokens = np.arange(10_000) % 251
    a = data.batches(tokens, batch_size=3, seq_len=16, seed=5)
    run = [next(a) for _ in range(6)]
    resumed = data.batches(tokens, batch_size=3, seq_len=16, seed=5, start_step=4)
    for want, got in zip(run[4:], [next(resumed) for _ in range(2)]):
        np.testing.assert_array_equal(want[0], got[0])
    x, y = run[0]
    assert x.shape == (3, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    other = next(data.batches(tokens, batch_size=3, seq_len=16, seed=6))
    assert not np.array_equal(other[0], x)
    with pytest.raises(data.DataError, match="too short"):
        next(data.batches(tokens[:10], batch_size=1, seq_len=16, seed=0))
    e1 = data.eval_batches(tokens, batch_size=2, seq_len=8, count=3)
    e2 = data.eval_batches(tokens, batch_size=2, seq_len=8, count=3)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(e1, e2))


@pytest.mark.parametrize(
    "name, write, message",
    [
        ("f.npy", lambda p: np.save(p, np.arange(100, dtype=np.float32)),
         "token ids must be integers, got dtype float32"),
        ("neg.npy", lambda p: np.save(p, np.arange(100, dtype=np.int32) - 3),
         "token ids must be >= 0, found -3 (first negative at 0)"),
        ("big.npy", lambda p: np.save(p, np.arange(100, dtype=np.int64) << 40),
         "is not below the vocabulary limit"),
        ("odd.bin", lambda p: p.write_bytes(b"\x01" * 201),
         "201 bytes is not a whole number of uint16 tokens"),
    ],
)
def test_bad_token_files_are_refused_naming_the_file(tmp_path, name, write, message):
    path = tmp_path / name
    write(path)
    with pytest.raises(data.DataError, match=re.escape(message)) as err:
        data.load_tokens(str(path))
    assert str(err.value).startswith(str(path))


def test_sources_are_named_portably(tmp_path):
    (tmp_path / "corpus").mkdir()
    folder = _corpus(tmp_path / "corpus")
    assert data.load_tokens(str(folder)).source == "corpus/ (61 files)"
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(256)))
    assert data.load_tokens(str(text)).source == "t.txt"
    stdlib = data.load_tokens(None, max_files=80).source
    assert data.portable_name(str(data.stdlib_root()), max_files=80) == stdlib
    assert data.portable_name("/some/machine/corpus") == "corpus"

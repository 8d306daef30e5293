"""Token data for the experiments: byte-level text corpora, token files, a seeded batch sampler.

The embedded default corpus is the Python standard library's own source code, found at run time
with ``sysconfig`` (no download): every ``*.py`` file under the stdlib directory (site-packages
excluded), sorted, split into train and validation **by file** with a stable hash of the
relative path (about 5% of the files go to validation), each split concatenated as UTF-8 bytes.
Any text file or folder can be given instead (same by-file split for folders; a single file is
split at 95% of its bytes), a pre-tokenized ``.npy``/``.bin`` token file is memory-mapped, and a
saved Hugging Face ``datasets`` directory (``datasets.save_to_disk``) is read when the library is
installed.

Sources are named portably in results (``TokenSplits.source``): "Python 3.11 standard library,
1,234 files", a folder or file by its own name, never by this machine's absolute path.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
import sys
import sysconfig
from collections.abc import Iterator

import numpy as np

VAL_FRACTION = 0.05
"""Share of the files (by stable hash) that go to validation."""

MAX_VOCAB = 1 << 24
"""Largest token id + 1 accepted from a token file (the model's embedding has this many rows)."""


class DataError(ValueError):
    """A data source that cannot be used (the message names the path and the problem)."""


@dataclasses.dataclass(frozen=True)
class TokenSplits:
    """Train and validation token streams (1-D integer arrays, possibly memory-mapped).

    Attributes:
      train: training tokens.
      val: validation tokens.
      vocab_size: number of token ids (256 for bytes).
      source: where the tokens came from, named portably (no absolute path).
    """

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    source: str


def _is_val(rel: str) -> bool:
    digest = hashlib.sha256(rel.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < VAL_FRACTION


def stdlib_root() -> pathlib.Path:
    """The standard library's source directory of the running Python."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _text_files(root: pathlib.Path, pattern: str) -> list[pathlib.Path]:
    files = sorted(p for p in root.rglob(pattern) if p.is_file() and "site-packages" not in p.parts)
    return files


def stdlib_name(files: int) -> str:
    """The portable name of the default corpus: "Python 3.11 standard library, 1,234 files"."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"Python {version} standard library, {files:,} files"


def portable_name(source: str, *, max_files: int | None = None) -> str:
    """``source`` as results name it: the standard library's folder (as an older version of this
    module recorded it) becomes :func:`stdlib_name`, any other path its last component."""
    if source == str(stdlib_root()):
        return load_tokens(None, max_files=max_files).source
    if "/" not in source.rstrip("/"):
        return source
    return pathlib.PurePath(source).name + ("/" if source.endswith("/") else "")


def split_files(
    root: pathlib.Path, files: list[pathlib.Path], name: str | None = None
) -> TokenSplits:
    """Concatenated UTF-8 bytes of ``files``, split by a stable hash of their relative path.

    ``name`` (default: the folder's own name and the file count) is the portable source name.
    """
    train, val = bytearray(), bytearray()
    for f in files:
        rel = f.relative_to(root).as_posix()
        data = f.read_bytes()
        (val if _is_val(rel) else train).extend(data + b"\n")
    if not train or not val:
        raise DataError(f"{root}: too few files to split into train and validation ({len(files)})")
    name = name or f"{root.name}/ ({len(files):,} files)"
    return TokenSplits(
        np.frombuffer(bytes(train), np.uint8), np.frombuffer(bytes(val), np.uint8), 256, name
    )


@functools.lru_cache(maxsize=4)
def load_tokens(source: str | None = None, *, max_files: int | None = None) -> TokenSplits:
    """Loads the train/validation tokens of ``source``.

    Args:
      source: None (the standard library's ``*.py`` files), a folder (its ``*.py``, ``*.txt``
        and ``*.md`` files), a text file, a token file (``.npy``: any integer dtype; ``.bin``:
        uint16, nanoGPT's format; split at 95%), or ``hf:<path>`` for a saved ``datasets``
        directory with a ``text`` column (split by row hash).
      max_files: use only the first ``max_files`` files of a folder (by sorted path).

    Returns:
      A :class:`TokenSplits` (cached: repeated runs in one process read the corpus once).

    Raises:
      DataError: for a missing path, an empty corpus, an unreadable format, a token file of
        floats, negative ids or ids of ``MAX_VOCAB`` or more, or a ``.bin`` of an odd size.
    """
    if source is None:
        root = stdlib_root()
        files = _text_files(root, "*.py")
        files = files[:max_files] if max_files else files
        return split_files(root, files, stdlib_name(len(files)))
    if source.startswith("hf:"):
        return _load_hf(source[3:])
    path = pathlib.Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file or folder")
    if path.is_dir():
        files = sorted(
            {*_text_files(path, "*.py"), *_text_files(path, "*.txt"), *_text_files(path, "*.md")}
        )
        if max_files:
            files = files[:max_files]
        if not files:
            raise DataError(f"{source}: no .py, .txt or .md files in this folder")
        return split_files(path, files)
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        vocab = _check_ids(source, tokens)
    elif path.suffix == ".bin":
        if path.stat().st_size % 2:
            raise DataError(
                f"{source}: {path.stat().st_size} bytes is not a whole number of uint16 tokens"
            )
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        vocab = 1 << 16
    else:
        tokens = np.frombuffer(path.read_bytes(), np.uint8)
        vocab = 256
    if tokens.ndim != 1 or tokens.size < 64:
        raise DataError(
            f"{source}: expected a 1-D stream of at least 64 tokens, got {tokens.shape}"
        )
    cut = int(0.95 * tokens.size)
    return TokenSplits(tokens[:cut], tokens[cut:], vocab, path.name)


def _check_ids(source: str, tokens: np.ndarray) -> int:
    """The vocabulary size of a ``.npy`` token array after checking its ids."""
    if not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{source}: token ids must be integers, got dtype {tokens.dtype}")
    if not tokens.size:
        return 0
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0:
        at = int(np.argmax(np.asarray(tokens).ravel() < 0))
        raise DataError(f"{source}: token ids must be >= 0, found {low} (first negative at {at})")
    if high >= MAX_VOCAB:
        raise DataError(f"{source}: token id {high} is not below the vocabulary limit {MAX_VOCAB}")
    return high + 1


def _load_hf(path: str) -> TokenSplits:
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise DataError(f"hf:{path}: the 'datasets' package is not installed") from e
    if not pathlib.Path(path).exists():
        raise DataError(f"hf:{path}: no such saved dataset")
    ds = datasets.load_from_disk(path)
    if "text" not in ds.column_names:
        raise DataError(f"hf:{path}: no 'text' column (columns: {ds.column_names})")
    train, val = bytearray(), bytearray()
    for i, text in enumerate(ds["text"]):
        (val if _is_val(f"row{i}") else train).extend(text.encode() + b"\n")
    if not train or not val:
        raise DataError(f"hf:{path}: too few rows to split into train and validation")
    return TokenSplits(
        np.frombuffer(bytes(train), np.uint8),
        np.frombuffer(bytes(val), np.uint8),
        256,
        f"hf:{pathlib.PurePath(path).name}",
    )


def sample_batch(
    tokens: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random contiguous windows: ``(inputs, targets)``, int32 ``[B, T]``, targets shifted by 1."""
    if tokens.size < seq_len + 2:
        raise DataError(f"a stream of {tokens.size} tokens is too short for windows of {seq_len}")
    starts = rng.integers(0, tokens.size - seq_len - 1, size=batch_size)
    windows = np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts]).astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def batches(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int, start_step: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The deterministic batch stream of a run: batch ``k`` depends only on ``(seed, k)``, so a
    run resumed at ``start_step`` sees exactly the batches it would have seen."""
    step = start_step
    while True:
        rng = np.random.default_rng([seed, step])
        yield sample_batch(tokens, rng, batch_size, seq_len)
        step += 1


def eval_batches(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, count: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed set of validation batches (the same at every evaluation and in every run)."""
    rng = np.random.default_rng(12345)
    return [sample_batch(tokens, rng, batch_size, seq_len) for _ in range(count)]

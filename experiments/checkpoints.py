"""Checkpoints of experiments/train.py that are verified before they are trusted.

A checkpoint is an orbax step directory ``<out>/ckpt/<step>/`` plus a manifest
``<out>/ckpt/<step>.manifest.json`` written after orbax has finished the directory. The
manifest records the run it belongs to (a digest of the run's settings), the layout of the saved
tree (path, shape and dtype of every leaf) and the sha256 of every file of the step directory.
A checkpoint without a manifest (a save cut short) or whose files no longer match it (a flipped
bit, a truncated or missing file) is not restored: :func:`restore_latest` falls back to the
previous intact one and says why. :func:`save` keeps the last ``KEEP`` checkpoints so that a
fallback exists.

On several processes (``jax.process_count() > 1``) every process writes its shards through
orbax; process 0 alone writes the manifest and removes old checkpoints, between barriers, and
every process verifies the same files before restoring (the folder must be shared).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import sys
from typing import Any

import jax
import numpy as np

KEEP = 2
"""Checkpoints kept after each save (the newest first); older ones are removed."""

MANIFEST = ".manifest.json"
"""Suffix of the manifest written next to each step directory."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (the message names its path and the reason)."""


def barrier(name: str) -> None:
    """Waits for every process (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


def sha256(path: pathlib.Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest(settings: dict[str, Any]) -> str:
    """A short, stable digest of a JSON-serializable settings dict (keys sorted)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def layout(tree: Any) -> list[list[Any]]:
    """``[path, shape, dtype]`` of every leaf of ``tree`` (arrays or shape/dtype structs)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [[jax.tree_util.keystr(p), list(np.shape(x)), str(x.dtype)] for p, x in leaves]


def steps(ckpt_dir: pathlib.Path) -> list[int]:
    """The step numbers of the step directories in ``ckpt_dir``, newest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()), reverse=True)


def _files(step_dir: pathlib.Path) -> dict[str, str]:
    return {
        p.relative_to(step_dir).as_posix(): sha256(p)
        for p in sorted(step_dir.rglob("*"))
        if p.is_file()
    }


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(ckpt_dir: pathlib.Path, step: int, tree: Any, run: str) -> pathlib.Path:
    """Saves ``tree`` as checkpoint ``step`` of run ``run`` (a :func:`digest`), then its manifest.

    Checkpoints beyond the ``KEEP`` newest (by step, this one included) are removed afterwards.

    Returns:
      The step directory.
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415 - heavy import, only for runs

    path = ckpt_dir / str(step)
    manifest = ckpt_dir / f"{step}{MANIFEST}"
    if jax.process_index() == 0:
        manifest.unlink(missing_ok=True)
        if path.exists():
            shutil.rmtree(path)
    barrier(f"ckpt-clear-{step}")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, tree)
        ckpt.wait_until_finished()
    barrier(f"ckpt-saved-{step}")
    if jax.process_index() == 0:
        record = {"step": step, "run": run, "layout": layout(tree), "files": _files(path)}
        _write_atomic(manifest, json.dumps(record, indent=1))
        for old in steps(ckpt_dir)[KEEP:]:
            (ckpt_dir / f"{old}{MANIFEST}").unlink(missing_ok=True)
            shutil.rmtree(ckpt_dir / str(old))
    barrier(f"ckpt-done-{step}")
    return path


def verify(ckpt_dir: pathlib.Path, step: int, run: str) -> dict[str, Any]:
    """The manifest of checkpoint ``step`` once its files and run are checked.

    Raises:
      CheckpointError: no manifest, another run's checkpoint, or a file missing, added or
        different from its recorded sha256 (the message names the first such file).
    """
    path = ckpt_dir / str(step)
    manifest = ckpt_dir / f"{step}{MANIFEST}"
    if not manifest.exists():
        raise CheckpointError(f"{path}: no manifest (the save did not finish)")
    try:
        record = json.loads(manifest.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest}: unreadable manifest ({e.msg})") from None
    if record.get("run") != run:
        raise CheckpointError(f"{path}: written by another run (settings digest differs)")
    files = _files(path) if path.is_dir() else {}
    for name in sorted(record["files"].keys() | files.keys()):
        if name not in files:
            raise CheckpointError(f"{path}: file {name} is missing")
        if name not in record["files"]:
            raise CheckpointError(f"{path}: file {name} is not in the manifest")
        if files[name] != record["files"][name]:
            raise CheckpointError(f"{path}: file {name} does not match its sha256")
    return record


def _check_layout(path: pathlib.Path, saved: list[list[Any]], want: list[list[Any]]) -> None:
    if saved == want:
        return
    saved_by, want_by = {s[0]: s[1:] for s in saved}, {w[0]: w[1:] for w in want}
    differ = sorted(
        k for k in saved_by.keys() | want_by.keys() if saved_by.get(k) != want_by.get(k)
    )
    first = differ[0]

    def show(x):
        return "absent" if x is None else f"{tuple(x[0])} {x[1]}"

    raise CheckpointError(
        f"{path}: the saved parameter/optimizer-state layout differs from this run's "
        f"({len(differ)} leaves differ; first {first}: saved {show(saved_by.get(first))}, "
        f"now {show(want_by.get(first))})"
    )


def _finite(tree: Any) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, np.inexact)]
    return all(bool(jax.numpy.isfinite(x).all()) for x in leaves)


def restore_latest(ckpt_dir: pathlib.Path, target: Any, run: str) -> tuple[int, Any] | None:
    """Restores the newest intact checkpoint of run ``run`` into the layout of ``target``.

    Newer checkpoints that fail :func:`verify` (or restore non-finite values) are skipped with
    a message on stderr naming them and the reason.

    Returns:
      ``(step, tree)``, or None when ``ckpt_dir`` holds no checkpoint at all.

    Raises:
      CheckpointError: checkpoints exist but none is intact, or the layout differs.
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415

    found = steps(ckpt_dir)
    if not found:
        return None
    want = layout(target)
    problems = []
    for step in found:
        path = ckpt_dir / str(step)
        try:
            record = verify(ckpt_dir, step, run)
            _check_layout(path, record["layout"], want)
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
            try:
                with ocp.StandardCheckpointer() as ckpt:
                    tree = ckpt.restore(path.absolute(), abstract)
            except Exception as e:  # noqa: BLE001 - orbax raises many kinds; one line instead
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                raise CheckpointError(f"{path}: orbax could not restore it ({first})") from None
            if not _finite(tree):
                raise CheckpointError(f"{path}: restored values are not finite")
        except CheckpointError as e:
            if "layout differs" in str(e):
                raise
            problems.append(str(e))
            print(f"warning: {e}; trying an older checkpoint", file=sys.stderr)
            continue
        if problems:
            print(f"note: resuming from the intact checkpoint {path}", file=sys.stderr)
        return step, tree
    raise CheckpointError(
        f"{ckpt_dir}: no intact checkpoint ({'; '.join(problems)}); move the folder away to "
        "start over"
    )

"""compare.py: the sweep, the table's arithmetic, the report, and memory/spike tools."""

import json
import math

import numpy as np
import pytest

from experiments import compare, memory, registry, spikes


def test_crossing_interpolates_between_evaluations():
    assert compare.crossing([10, 20, 30], [5.0, 3.0, 1.0], 2.0) == pytest.approx(25.0)
    assert compare.crossing([10, 20], [1.0, 0.5], 2.0) == 10  # already below at the first
    assert compare.crossing([10, 20], [5.0, 4.0], 2.0) is None


def _run(name, lr, final, tokens, losses, update=None):
    return {"optimizer": name, "learning_rate": lr, "final_val_loss": final,
            "best_val_loss": min(losses), "state_bytes_per_param": 8.0, "update_s": update,
            "curve": {"tokens": tokens, "wall": [t / 100 for t in tokens], "val_loss": losses}}


def test_table_picks_the_best_lr_and_computes_speedup_against_adamw():
    runs = [
        _run("adamw", 1e-3, 3.0, [100, 200, 300, 400], [5, 4, 3.5, 3.0], 1.0),
        _run("adamw", 1e-2, math.nan, [100, 200, 300, 400], [5, 9, 9, math.nan], 1.0),
        _run("muon", 0.02, 2.5, [100, 200, 300, 400], [4.5, 3.0, 2.7, 2.5], 1.5),
    ]
    md, target = compare.table(runs)
    assert target == 3.0  # AdamW's best final validation loss
    muon_row = next(line for line in md.splitlines() if line.startswith("| muon"))
    cells = [c.strip() for c in muon_row.strip("|").split("|")]
    # muon reaches 3.0 at 200 tokens, AdamW at 400: 2x; update time 1.5x AdamW's
    assert cells[1] == "0.02" and cells[4] == "200" and cells[6] == "2.00x"
    assert cells[8] == "1.50x"
    assert md.splitlines()[2].startswith("| muon")  # sorted by final loss


def test_sweep_lrs_centres_on_the_default():
    e = registry.get("adamw")
    assert compare.sweep_lrs(e, 1) == (e.lr,)
    assert compare.sweep_lrs(e, 3) == e.grid
    with pytest.raises(ValueError, match="--sweep"):
        compare.sweep_lrs(e, 0)


def test_compare_end_to_end_and_report(tmp_path, capsys):
    flags = ["--name", "t", "--results", str(tmp_path), "--optimizers", "adamw,lion",
             "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-every", "3",
             "--sweep", "1", "--max-files", "40", "--update-reps", "1"]
    assert compare.main(flags) == 0
    folder = tmp_path / "t"
    md = (folder / "results.md").read_text()
    assert "| adamw | 0.003 |" in md and "| lion | 0.0003 |" in md
    assert "| 1.00x |" in md  # AdamW against itself
    for png in ("loss_vs_tokens.png", "loss_vs_wall.png", "lr_sensitivity.png"):
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"
    runs = [json.loads(line) for line in (folder / "results.jsonl").read_text().split("\n")
            if line]
    assert all(r["curve"]["val_loss"][-1] < r["curve"]["val_loss"][0] for r in runs)
    (folder / "results.md").unlink()
    assert compare.main(flags + ["--report"]) == 0  # regenerated from the JSONL alone
    assert (folder / "results.md").read_text() == md
    assert "plot:" in capsys.readouterr().out


def test_compare_errors(tmp_path, capsys):
    assert compare.main(["--optimizers", "adamw,nope", "--results", str(tmp_path)]) == 2
    assert "unknown optimizer 'nope'" in capsys.readouterr().err
    assert compare.main(["--name", "none", "--results", str(tmp_path), "--report"]) == 2
    assert "no results to report" in capsys.readouterr().err


def test_memory_table_on_real_shapes_without_allocation(tmp_path):
    md, rows = memory.memory_table(["adamw", "adamw_8bit", "galore"], ["llama-7b"])
    by = {r["optimizer"]: r for r in rows}
    n = by["adamw"]["params"]
    assert 6.6e9 < n < 6.8e9
    assert by["adamw"]["state_bytes"] / n == pytest.approx(8.0, abs=1e-6)
    assert by["adamw_8bit"]["state_bytes"] / n == pytest.approx(2.03, abs=0.01)
    assert by["galore"]["state_bytes"] < by["adamw"]["state_bytes"] / 4
    assert "llama-7b (6,738M)" in md


def test_memory_covers_every_registered_optimizer(tmp_path):
    assert memory.main(["--models", "llama-60m", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "memory.json").read_text())
    assert {r["optimizer"] for r in rows} == set(registry.OPTIMIZERS)
    assert memory.main(["--models", "llama-9000", "--out", str(tmp_path)]) == 2


def test_spike_recovery_measure():
    clean = [3.0] * 30
    spiked = [3.0] * 10 + [9.0] * 5 + [3.0] * 15
    assert spikes.recovery(clean, spiked, 10, 0.02) == 5
    assert spikes.recovery(clean, [3.0] * 10 + [9.0] * 20, 10, 0.02) is None


def test_spikes_end_to_end(tmp_path, capsys):
    flags = ["--optimizers", "adamw", "--steps", "8", "--spike-step", "4",
             "--batch-size", "4", "--seq-len", "32", "--max-files", "40", "--out", str(tmp_path)]
    assert spikes.main(flags) == 0
    rows = json.loads((tmp_path / "spikes.json").read_text())
    adamw = next(r for r in rows if r["optimizer"] == "adamw")
    # identical until the spike, up to rounding: the spiked run is another compiled program
    np.testing.assert_allclose(adamw["clean"][:5], adamw["spiked"][:5], rtol=1e-6)
    assert abs(adamw["clean"][5] - adamw["spiked"][5]) > 1e-4  # and the spike shows at once
    assert (tmp_path / "spikes.png").exists() and "| adamw |" in capsys.readouterr().out
    assert spikes.main(flags[:-2] + ["--spike-step", "20", "--out", str(tmp_path)]) == 2


def test_compare_appends_and_keys_records_by_every_setting(tmp_path):
    flags = ["--name", "t", "--results", str(tmp_path), "--optimizers", "adamw", "--sweep", "1",
             "--batch-size", "4", "--seq-len", "32", "--eval-every", "2", "--max-files", "40",
             "--update-reps", "1"]
    assert compare.main([*flags, "--steps", "2"]) == 0
    assert compare.main([*flags, "--steps", "4"]) == 0  # other steps: a new run, not the old one
    folder = tmp_path / "t"
    records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in records] == [2, 4]  # appended, the first kept
    assert [r["settings"]["steps"] for r in records] == [2, 4]
    assert len(records[1]["curve"]["val_loss"]) == 2
    assert "4 steps" in (folder / "results.md").read_text()
    assert compare.main([*flags, "--steps", "2", "--report"]) == 0  # the first one, still there
    assert "2 steps" in (folder / "results.md").read_text()
    assert compare.main([*flags, "--steps", "3", "--report"]) == 2  # never ran


def test_report_gives_older_records_settings_and_a_portable_data_name(tmp_path):
    from experiments import data

    folder = tmp_path / "old"
    folder.mkdir()
    old = {**_run("adamw", 1e-3, 3.0, [128, 256], [4.0, 3.0], 1.0), "model": "gpt2-tiny",
           "params": 10, "steps": 2, "tokens": 256, "data": str(data.stdlib_root())}
    (folder / "results.jsonl").write_text(json.dumps(old) + "\n")
    flags = ["--name", "old", "--results", str(tmp_path), "--steps", "2", "--batch-size", "4",
             "--seq-len", "32", "--max-files", "40", "--report"]
    assert compare.main(flags) == 0
    md = (folder / "results.md").read_text()
    assert "data: Python 3." in md and "standard library, 40 files" in md
    assert str(data.stdlib_root()) not in md + (folder / "results.jsonl").read_text()
    (record,) = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert record["settings"]["steps"] == 2 and record["curve"] == old["curve"]
    assert compare.main(flags[:4] + ["--steps", "3"] + flags[6:]) == 2  # no such records

"""bench_step.py --small runs (a smoke test: no timing assertions) and its FLOP count."""

import jax.numpy as jnp

from experiments import bench_step


def test_newton_schulz_flops_count_each_matmul():
    # one 4x8 matrix, one step: X X^T (2*4*4*8) + A A (2*4^3) + B X (2*4*4*8)
    assert bench_step.newton_schulz_flops([(4, 8)], steps=1) == 4 * 16 * 8 + 2 * 64
    # a stacked leaf counts once per matrix; orientation does not matter
    assert bench_step.newton_schulz_flops([(3, 8, 4)], steps=2) == 3 * 2 * (4 * 16 * 8 + 2 * 64)


def test_small_run_writes_the_table(tmp_path, capsys):
    out = tmp_path / "bench.md"
    code = bench_step.main(["--small", "--reps", "2", "--optimizers", "conda",
                            "--out", str(out)])
    assert code == 0
    text = out.read_text()
    for name in ("adamw", "optax_muon", "conda"):
        assert f"| {name} |" in text
    assert "| adamw | 1.00x |" in text and "floors on this device" in text
    assert "median ms" not in text  # CPU: ratios only
    assert bench_step.main(["--small", "--optimizers", "nope"]) == 2
    assert "unknown optimizer" in capsys.readouterr().err


def test_param_tree_has_the_preset_shapes():
    params = bench_step.param_tree("gpt2-tiny")
    shapes = bench_step.hidden_matrices(params)
    assert shapes and all(len(s) >= 2 for s in shapes)
    assert all(x.dtype == jnp.float32 for x in __import__("jax").tree.leaves(params))

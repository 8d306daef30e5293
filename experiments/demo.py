"""The main job (``make demo``): AdamW vs Muon vs Conda vs SPAM vs APOLLO-Mini on a tiny GPT.

Trains each optimizer on the embedded corpus (the Python standard library's source, byte-level)
with a 3-point learning-rate sweep, 200 steps of 16 x 64 tokens on GPT-2-tiny, then prints the
comparison table and the paths of the plots in ``results/demo/``. About 5 minutes on a 2-core
CPU. Runs already in ``results/demo/runs/`` are reused; delete the folder to start afresh.
"""

from __future__ import annotations

import sys

from experiments import compare

DEMO = compare.CompareConfig(
    name="demo",
    optimizers=("adamw", "muon", "conda", "spam", "apollo_mini"),
    model="gpt2-tiny",
    steps=200,
    batch_size=16,
    seq_len=64,
    eval_every=25,
    sweep=3,
)


def main(argv: list[str] | None = None) -> int:
    """Runs the demo comparison; flags of ``experiments.compare`` override its settings."""
    return compare.main(argv, defaults=DEMO)


if __name__ == "__main__":
    sys.exit(main())

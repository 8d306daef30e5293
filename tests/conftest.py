"""Pytest configuration shared by the whole suite."""

# XLA's concurrency-optimized CPU scheduler can deadlock programs with many LAPACK calls inside
# a conditional on 2 cores: importing the experiments package turns it off (see its docstring).
import os

import experiments

# CPU compilation dominates the suite's run time (the shapes are small), so the suite compiles
# for compile speed: LLVM at -O0, and XLA's classic elemental fusion emitters instead of the
# MLIR fusion emitters, which compile the recipes' many small fusions 3-7x slower. Both only
# change how the same HLO is code-generated; each flag is set only where the installed jaxlib
# knows it (XLA aborts on unknown flags). Set before JAX initialises its backend, and inherited
# by the suite's subprocesses (multi-device checks, multi-host and training runs).
experiments.add_xla_flag("xla_backend_optimization_level", "0")
experiments.add_xla_flag("xla_cpu_use_fusion_emitters", "false")

import hypothesis  # noqa: E402
import pytest  # noqa: E402

# Few examples over few sizes: every new shape is a new XLA compilation.
hypothesis.settings.register_profile(
    "optax_ext", max_examples=12, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "optax_ext"))


# The longest tests (each a subprocess with 8 fake devices, or several processes), longest
# first: pytest-xdist hands out work in collection order, so starting them first keeps both
# workers busy to the end instead of leaving one of them running a long check alone.
LONGEST_FIRST = (
    "check_recipes.py",
    "check_foreign.py",
    "check_state_layout.py",
    "test_multihost.py",
    "check_sharding.py",
    "check_train_mesh.py",
    "check_soap_cosmos.py",
    "check_onebit_adam.py",
)


def _rank(item) -> int:
    for i, fragment in enumerate(LONGEST_FIRST):
        if fragment in item.nodeid:
            return i
    return len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``--dist loadgroup``), keep every check of one recipe on one worker
    so its compiled steps are shared, and start the longest tests first."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "name" in params and item.module.__name__.endswith("test_conventions"):
            item.add_marker(pytest.mark.xdist_group(params["name"]))
    items.sort(key=_rank)  # stable: the rest keep their order

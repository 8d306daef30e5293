"""Pytest configuration shared by the whole suite."""

import os

# CPU compilation dominates the suite's run time; LLVM's optimisation level barely matters for
# the small shapes of the tests. Must be set before JAX initialises its backend.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import hypothesis  # noqa: E402
import pytest  # noqa: E402

# XLA's concurrency-optimized CPU scheduler can deadlock programs with many LAPACK calls inside
# a conditional on 2 cores: importing the experiments package turns it off (see its docstring).
import experiments  # noqa: E402, F401

# Few examples over few sizes: every new shape is a new XLA compilation.
hypothesis.settings.register_profile(
    "optax_ext", max_examples=12, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "optax_ext"))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``--dist loadgroup``), keep every check of one recipe on one worker
    so its compiled steps are shared."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "name" in params and item.module.__name__.endswith("test_conventions"):
            item.add_marker(pytest.mark.xdist_group(params["name"]))

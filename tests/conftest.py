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

# Few examples over few sizes: every new shape is a new XLA compilation.
hypothesis.settings.register_profile(
    "optax_ext", max_examples=12, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "optax_ext"))


# The longest tests (each a subprocess with 8 fake devices, or several processes), longest
# first: pytest-xdist hands out work in collection order, so starting them first keeps both
# workers busy to the end instead of leaving one of them running a long check alone.
LONGEST_FIRST = (
    "check_recipes.py",  # with check_state_layout.py (tests/test_distributed.py)
    "check_foreign.py",  # with the other multi-device checks
    "test_multihost.py",
)


def _rank(item) -> int:
    for i, fragment in enumerate(LONGEST_FIRST):
        if fragment in item.nodeid:
            return i
    return len(LONGEST_FIRST)


# Modules whose checks of one recipe share compiled steps (functools.cache per process; the
# float32 step of tests/recipe_steps.py is shared by both).
GROUPED = ("test_conventions.py", "test_bad_input.py")


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to under ``--dist loadgroup``: the checks of one recipe
    in the GROUPED modules form one unit (one worker, one compilation of its steps); every other
    test is a unit of its own.

    Derived from the node id alone, on the controller: xdist's own ``xdist_group`` marks reach
    the scheduler by a suffix written into the worker's node ids, which pytest 9.2 no longer
    carries (pytest-xdist issue 1386), and the tests were then spread one by one.
    """
    path, _, test = nodeid.partition("::")
    if path.endswith(GROUPED) and test.endswith("]") and "[" in test:
        return f"recipe[{test[test.index('[') + 1:-1]}]"
    return nodeid


def pytest_collection_modifyitems(config, items):
    """Start the longest tests first (xdist hands out units in collection order)."""
    items.sort(key=_rank)  # stable: the rest keep their order


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest-xdist is a test extra; without it the suite runs in one process
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:

    class RecipeScheduling(LoadScopeScheduling):
        """xdist's scope scheduling with :func:`work_unit` as the scope, in collection order."""

        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") != "loadgroup":
            return None
        config.option.loadscopereorder = False  # keep LONGEST_FIRST's order
        return RecipeScheduling(config, log)

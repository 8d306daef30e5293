"""How ``make test`` spreads the suite over xdist workers (tests/conftest.py)."""

import conftest
import pytest


def test_checks_of_one_recipe_form_one_work_unit():
    unit = conftest.work_unit
    a = unit("tests/test_conventions.py::test_bf16_params[soap]")
    assert a == unit("tests/test_conventions.py::test_orbax_round_trip[soap]")
    assert a != unit("tests/test_conventions.py::test_bf16_params[soap:one_sided_1d]")
    # the bad-input checks of the recipe read the same compiled float32 step
    assert a == unit("tests/test_bad_input.py::test_tiny_and_nd_leaves_give_finite_updates[soap]")
    bad = unit("tests/test_bad_input.py::test_zero_size_leaves_pass_through_with_stable_state"
               "[chain:project_low_rank(svd)]")
    assert bad == unit("tests/test_bad_input.py::test_float16_params_give_finite_float16_updates"
                       "[chain:project_low_rank(svd)]")
    # every other test is a unit of its own
    other = "tests/test_views.py::test_every_matrix_recipe_takes_its_views_from_the_one_rule[root]"
    assert unit(other) == other
    assert unit("tests/test_conventions.py::test_plain") == "tests/test_conventions.py::test_plain"


def test_loadgroup_uses_the_recipe_scheduler_in_collection_order(pytestconfig, monkeypatch):
    pytest.importorskip("xdist")
    monkeypatch.setattr(pytestconfig.option, "dist", "loadgroup")
    monkeypatch.setattr(pytestconfig.option, "loadscopereorder", True)
    monkeypatch.setattr(pytestconfig.option, "tx", ["2*popen"])  # `make test`: -n 2
    sched = conftest.pytest_xdist_make_scheduler(pytestconfig, log=None)
    assert isinstance(sched, conftest.RecipeScheduling)
    assert pytestconfig.option.loadscopereorder is False  # the longest checks stay first
    assert sched._split_scope("tests/test_bad_input.py::test_x[lion]") == "recipe[lion]"
    monkeypatch.setattr(pytestconfig.option, "dist", "load")
    assert conftest.pytest_xdist_make_scheduler(pytestconfig, log=None) is None

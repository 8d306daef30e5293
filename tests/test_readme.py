"""The README's usage example runs and trains."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_usage_example_trains_a_few_steps():
    code = re.search(r"## Usage\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, (4, 17)), jnp.int32)
    params, other, opt_state = scope["params"], scope["other"], scope["opt_state"]
    losses = []
    for _ in range(4):
        params, other, opt_state, loss = scope["train_step"](
            params, other, opt_state, tokens[:, :-1], tokens[:, 1:]
        )
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_experiment_commands_in_the_readme_parse():
    from experiments import compare, registry, train  # noqa: PLC0415

    block = re.search(r"## Experiments\n\n```bash\n(.*?)```", README.read_text(), re.S).group(1)
    seen = set()
    for line in block.splitlines():
        args = line.split("#")[0].split()
        module, flags = args[2], args[3:]
        seen.add(module)
        if module == "experiments.train":
            registry.get(train.parse_args(flags).optimizer)
        elif module == "experiments.compare":
            cfg, _ = compare.parse_args(flags)
            for name in cfg.optimizers:
                registry.get(name)
    assert {"experiments.train", "experiments.compare", "experiments.memory"} <= seen


def test_trainer_section_runs_and_its_table_matches_describe(capsys):
    text = README.read_text()
    section = re.search(r"## Use it in your trainer\n(.*?)\n## ", text, re.S).group(1)
    code, table = re.findall(r"```(?:python)?\n(.*?)```", section, re.S)[:2]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    printed = capsys.readouterr().out.splitlines()
    for line in table.strip().splitlines():
        assert line in printed, line
    tx, params, opt_state = scope["tx"], scope["params"], scope["opt_state"]
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, opt_state, params)
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))

"""The README's usage example runs and trains."""

import pathlib
import re

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

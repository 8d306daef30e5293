"""Pytest configuration shared by the whole suite."""

import os

import hypothesis

# Few examples over few sizes: every new shape is a new XLA compilation.
hypothesis.settings.register_profile(
    "optax_ext", max_examples=12, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "optax_ext"))

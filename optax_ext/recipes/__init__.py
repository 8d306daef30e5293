"""Recipes: one paper per file, each a short optax.chain of primitives plus its partition."""

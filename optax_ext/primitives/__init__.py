"""Primitives: small optax GradientTransformations, one idea each."""

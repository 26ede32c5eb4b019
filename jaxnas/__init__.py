"""jaxnas: robust differentiable neural architecture search in JAX."""

__version__ = "0.1.0"

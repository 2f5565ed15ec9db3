"""pyroflows: normalizing flows for Pyro (``pyroflows.torch``) and NumPyro (``pyroflows.jax``).

Importing this package imports no backend; import the backend you use.
"""

__version__ = "0.1.0"

"""pyroflows: normalizing flows for Pyro (``pyroflows.torch``) and NumPyro (``pyroflows.jax``).

Importing this package imports no backend; import the backend you use. The modules at
this level are backend-neutral (plain Python and numpy): the table of flow families
(``registry``), argument checks (``validation``), and the halves of training, guides and
file formats that both backends share.

Example:
    >>> import pyroflows
    >>> pyroflows.__version__
    '0.1.0'
    >>> from pyroflows.registry import describe
    >>> describe("planar").split(":")[0]
    'planar (determinant identities)'
"""

__version__ = "0.1.0"

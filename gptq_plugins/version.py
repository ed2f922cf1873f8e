"""The package version, recorded in every artifact's `meta.quantizer`.

Its own module so that the modules recording it need not import the package, whose `__init__`
imports them in turn.
"""

__version__ = "0.1.0"

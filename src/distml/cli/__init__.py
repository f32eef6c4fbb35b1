"""The ``distml`` command line: thin argument parsing over :mod:`distml.api`."""

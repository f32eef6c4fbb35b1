"""The ``federated:`` config section, defined with the rest of the schema in :mod:`distml.config`.

Re-exported here for the federated package's own modules.
"""

from distml.config import FederatedSection

__all__ = ["FederatedSection"]

"""distml: a PyTorch-native toolkit for distributed training and serving.

The public Python API lives here so that notebooks and scripts can do what the
``distml`` CLI does: load a config, train, evaluate and predict. The CLI is a
thin layer over these functions.
"""

from __future__ import annotations

__version__ = "0.1.0"

from distml.errors import DistmlError, UserError

__all__ = ["DistmlError", "UserError", "__version__"]

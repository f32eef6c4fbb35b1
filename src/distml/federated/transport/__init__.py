"""gRPC deployment of federated learning: server, client, wire format and durable state.

``run_server(config)`` serves a federated job described by a distml config
(its ``federated:`` section is :class:`~distml.federated.config.FederatedSection`);
``run_client(server, data=...)`` joins it from another process or machine.
The protocol is defined in ``fl.proto``; the generated modules need
``protobuf>=7.35.1`` and ``grpcio>=1.85.1`` at run time.
"""

from distml.federated.transport.client import (
    ClientSummary,
    FederatedClient,
    run_client,
    train_local,
)
from distml.federated.transport.server import FederatedServer, load_tokens, run_server
from distml.federated.transport.store import ServerStore

__all__ = [
    "ClientSummary",
    "FederatedClient",
    "FederatedServer",
    "ServerStore",
    "load_tokens",
    "run_client",
    "run_server",
    "train_local",
]

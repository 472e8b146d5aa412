"""The node's connections send without Nagle's delay: small responses (C-FIND Pending,
C-MOVE counts) would otherwise each wait ~40 ms for the peer's delayed ACK."""

from __future__ import annotations

import socket
from collections.abc import Callable

from tests.support.nodes import RunningNode
from tests.support.wire import association


def test_accepted_connections_have_tcp_nodelay(start_node: Callable[..., RunningNode]) -> None:
    running = start_node()
    with association(running.port):
        server = running.node.acceptor._server
        assert server is not None
        [accepted] = server.active_associations
        channel = accepted.dul.socket.socket
        assert channel is not None
        assert channel.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1

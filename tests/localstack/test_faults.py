"""Which decision worker ``kill-worker`` picks: one holding a caller's connection."""

from __future__ import annotations

import os
import socket

from localstack.faults import connection_inodes, socket_inodes


def test_a_connection_to_a_port_is_found_among_the_sockets_of_the_process_holding_it():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert not connection_inodes(port) & socket_inodes(os.getpid())
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = listener.accept()
            with accepted:
                held = connection_inodes(port) & socket_inodes(os.getpid())
                assert held == {str(os.fstat(accepted.fileno()).st_ino)}

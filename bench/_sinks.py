"""Receivers for the emit benchmark's network baselines, in a process of their own.

Binds a ZeroMQ PULL (the floor), a ZeroMQ SUB (pyzmq's PUBHandler) and a TCP listener
(stdlib SocketHandler) on loopback, prints their endpoints as one JSON line, and discards
everything until stdin closes.
"""

from __future__ import annotations

import json
import socket
import sys
import threading

import zmq


def _discard_tcp(server: socket.socket) -> None:
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_drain, args=(conn,), daemon=True).start()


def _drain(conn: socket.socket) -> None:
    with conn:
        while conn.recv(1 << 16):
            pass


def _discard_zmq(*sockets: zmq.Socket[bytes]) -> None:
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            while True:
                try:
                    sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break


def main() -> int:
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull_port = pull.bind_to_random_port("tcp://127.0.0.1")
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub_port = sub.bind_to_random_port("tcp://127.0.0.1")
    server = socket.create_server(("127.0.0.1", 0))
    tcp_port = server.getsockname()[1]
    threading.Thread(target=_discard_tcp, args=(server,), daemon=True).start()
    threading.Thread(target=_discard_zmq, args=(pull, sub), daemon=True).start()
    print(json.dumps({"pull": pull_port, "sub": sub_port, "tcp": tcp_port}), flush=True)
    sys.stdin.read()  # until the benchmark exits
    return 0


if __name__ == "__main__":
    sys.exit(main())

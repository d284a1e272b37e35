"""A TCP echo peer and a probe of it, run on hosts of a WanNetwork: ``python -m tests.reliability.tcp_probe``.

``serve ADDRESS`` echoes every connection's bytes back on port 7777; ``probe ADDRESS BYTES`` connects to it
and prints one JSON line: the round-trip times of 5 one-byte messages and the seconds to send BYTES and get
them back (or ``{"error": ...}`` if the peer cannot be reached within 3 s).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

PORT = 7777


def echo(connection: socket.socket) -> None:
    with connection:
        while data := connection.recv(1 << 20):
            connection.sendall(data)


def serve(address: str) -> None:
    server = socket.create_server((address, PORT))
    while True:
        connection, _ = server.accept()
        threading.Thread(target=echo, args=(connection,), daemon=True).start()


def probe(address: str, size: int) -> dict:
    try:
        connection = socket.create_connection((address, PORT), timeout=3)
    except OSError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    connection.settimeout(60)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(5):
        started = time.perf_counter()
        connection.sendall(b"x")
        connection.recv(1)
        rtts.append(time.perf_counter() - started)
    started, received = time.perf_counter(), 0
    sender = threading.Thread(target=connection.sendall, args=(b"y" * size,))
    sender.start()
    while received < size:
        received += len(connection.recv(1 << 20))
    sender.join()
    return {"rtt_s": rtts, "echo_s": time.perf_counter() - started}


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        print(json.dumps(probe(sys.argv[2], int(sys.argv[3]))), flush=True)

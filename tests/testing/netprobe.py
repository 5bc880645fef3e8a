"""A tiny network probe run inside a namespace by tests/testing/test_netns.py (``ip netns exec NS python netprobe.py``).

Plain sockets (it starts in tens of milliseconds); every wait is bounded; one JSON line per event on stdout::

    tcp-serve HOST PORT SECONDS        {"listening": PORT}, then {"peer": [ip, port]} per connection (sends b"hi")
    tcp-connect HOST PORT TIMEOUT      {"result": "ok" | "timeout" | "<OSError class>", "reply": "..."}
    udp-serve PORT SECONDS             {"listening": PORT}, then {"peer": [ip, port]} per datagram; answers from the
                                       same socket (b"same") and from another port, PORT + 1 (b"other-port")
    udp-probe LPORT WAIT HOST:PORT...  sends from LPORT to each; {"replies": [[text, ip, port], ...]} after WAIT s
"""

from __future__ import annotations

import json
import socket
import sys
import time


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def tcp_serve(host: str, port: int, seconds: float) -> None:
    with socket.create_server((host, port), reuse_port=False) as server:
        emit(listening=server.getsockname()[1])
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            server.settimeout(left)
            try:
                conn, peer = server.accept()
            except TimeoutError:
                break
            with conn:
                emit(peer=list(peer))
                conn.sendall(b"hi")


def tcp_connect(host: str, port: int, timeout: float) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            reply = conn.recv(16)
    except TimeoutError:
        emit(result="timeout")
    except OSError as exc:
        emit(result=type(exc).__name__, errno=exc.errno)
    else:
        emit(result="ok", reply=reply.decode())


def udp_serve(port: int, seconds: float) -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other,
    ):
        sock.bind(("0.0.0.0", port))
        other.bind(("0.0.0.0", port + 1))
        emit(listening=port)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                _, peer = sock.recvfrom(64)
            except TimeoutError:
                break
            emit(peer=list(peer))
            other.sendto(b"other-port", peer)
            sock.sendto(b"same", peer)


def udp_probe(local_port: int, wait: float, targets: list[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", local_port))
        for target in targets:
            host, _, port = target.rpartition(":")
            sock.sendto(b"probe", (host, int(port)))
        replies = []
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, peer = sock.recvfrom(64)
            except TimeoutError:
                break
            replies.append([data.decode(), *peer])
        emit(replies=replies)


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "tcp-serve":
        tcp_serve(args[0], int(args[1]), float(args[2]))
    elif command == "tcp-connect":
        tcp_connect(args[0], int(args[1]), float(args[2]))
    elif command == "udp-serve":
        udp_serve(int(args[0]), float(args[1]))
    elif command == "udp-probe":
        udp_probe(int(args[0]), float(args[1]), args[2:])
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""A TCP stream with a marker payload between pods (run inside a pod's namespace; no
vppmesh import, standard library only).

  python tcp_stream.py recv PORT LOG
      accept streams; per source, one JSON line {"src", "t"} in LOG at most every 0.2 s
      while data arrives ({"src", "connect"} at each new connection)
  python tcp_stream.py send NAME PORT DST [DST ...]
      one stream to each DST: a hello naming NAME, then a marker line every 50 ms,
      reconnecting (after 0.5 s) whenever the connection fails
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

MARKER = b"VPPMESH-STORM-MARKER"
EVERY = 0.05
LOG_EVERY = 0.2


def receive(port: int, log_path: str) -> None:
    lock = threading.Lock()
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - open for the process's life

    def write(event: dict[str, object]) -> None:
        with lock:
            log.write(json.dumps(event) + "\n")

    def serve(conn: socket.socket) -> None:
        with conn:
            hello = b""
            while not hello.endswith(b"\n"):
                chunk = conn.recv(1)
                if not chunk:
                    return
                hello += chunk
            src = hello.decode(errors="replace").split()[-1]
            write({"src": src, "connect": time.time()})
            logged = 0.0
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                now = time.time()
                if now - logged >= LOG_EVERY:
                    write({"src": src, "t": now})
                    logged = now

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen(64)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def send(name: str, port: int, dst: str) -> None:
    line = MARKER + b" " + name.encode() + b" " + b"x" * 40 + b"\n"
    while True:
        try:
            with socket.create_connection((dst, port), timeout=5) as conn:
                conn.settimeout(30)
                conn.sendall(f"HELLO {name}\n".encode())
                while True:
                    conn.sendall(line)
                    time.sleep(EVERY)
        except OSError:
            time.sleep(0.5)


def main() -> None:
    mode = sys.argv[1]
    if mode == "recv":
        receive(int(sys.argv[2]), sys.argv[3])
        return
    name, port = sys.argv[2], int(sys.argv[3])
    threads = [threading.Thread(target=send, args=(name, port, dst), daemon=True)
               for dst in sys.argv[4:]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()

import socket


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct TCP ports free right now (held open together so they differ)."""
    sockets, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports

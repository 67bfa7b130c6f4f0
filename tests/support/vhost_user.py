"""A minimal vhost-user backend: enough of the handshake for QEMU 7.2 to start a
``-netdev vhost-user`` NIC, for tests that need a real QEMU with one.

QEMU 7.2 (net/vhost-user.c, ``net_vhost_user_init``) waits at start, before the
monitor answers, until its chardev is connected and ``vhost_net_init`` has run the
backend's part of ``vhost_dev_init`` (hw/virtio/vhost-user.c,
``vhost_user_backend_init``; docs/interop/vhost-user.rst): GET_FEATURES, and with
VHOST_USER_F_PROTOCOL_FEATURES offered GET_PROTOCOL_FEATURES and
SET_PROTOCOL_FEATURES, then GET_QUEUE_NUM when the MQ protocol feature is
acknowledged; then SET_OWNER, GET_FEATURES again and one SET_VRING_CALL (an eventfd
passed with SCM_RIGHTS) per virtqueue. Those are the only messages that need a
reply here; the rest (SET_FEATURES, SET_MEM_TABLE, SET_VRING_* once a guest driver
starts the device) are read and dropped, their fds closed: no virtqueue is served.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# docs/interop/vhost-user.rst, "Message types" (front-end message types).
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
SET_MEM_TABLE = 5
SET_VRING_CALL = 13
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
GET_VRING_BASE = 11
NAMES = {
    1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER", 5: "SET_MEM_TABLE",
    8: "SET_VRING_NUM", 9: "SET_VRING_ADDR", 10: "SET_VRING_BASE", 11: "GET_VRING_BASE",
    12: "SET_VRING_KICK", 13: "SET_VRING_CALL", 14: "SET_VRING_ERR",
    15: "GET_PROTOCOL_FEATURES", 16: "SET_PROTOCOL_FEATURES", 17: "GET_QUEUE_NUM",
    18: "SET_VRING_ENABLE", 19: "SEND_RARP", 20: "NET_SET_MTU",
}  # fmt: skip

# Header: request, flags, payload size (u32 each, native endian). flags: version 1 in
# bits 0-1, bit 2 marks a reply.
HEADER = struct.Struct("=III")
VERSION = 0x1
REPLY = 0x4
MAX_FDS = 8  # VHOST_MEMORY_BASELINE_NREGIONS: the most fds one message carries

VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32
FEATURES = VIRTIO_NET_F_MRG_RXBUF | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_F_VERSION_1
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_FEATURES = PROTOCOL_F_MQ
QUEUE_PAIRS = 1


class Backend:
    """Listens on ``path``; serves one front end (QEMU) in a thread; records the requests."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[str] = []
        self.error: BaseException | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._listener.close()
        self._thread.join(timeout=5)
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return  # closed before QEMU came
        with conn:
            try:
                while self._one(conn):
                    pass
            except OSError as err:
                self.error = err

    def _one(self, conn: socket.socket) -> bool:
        head, fds = _recv(conn, HEADER.size)
        if len(head) < HEADER.size:
            return False  # QEMU went away
        request, _flags, size = HEADER.unpack(head)
        payload = b""
        while len(payload) < size:
            chunk, more = _recv(conn, size - len(payload))
            if not chunk:
                return False
            payload += chunk
            fds += more
        for fd in fds:
            os.close(fd)  # a call/kick eventfd or guest memory: nothing is served here
        self.requests.append(NAMES.get(request, str(request)))
        value = {
            GET_FEATURES: FEATURES,
            GET_PROTOCOL_FEATURES: PROTOCOL_FEATURES,
            GET_QUEUE_NUM: QUEUE_PAIRS,
        }.get(request)
        if value is not None:
            conn.sendall(HEADER.pack(request, VERSION | REPLY, 8) + struct.pack("=Q", value))
        elif request == GET_VRING_BASE:
            index = struct.unpack_from("=I", payload)[0]
            reply = struct.pack("=II", index, 0)  # struct vhost_vring_state: index, num
            conn.sendall(HEADER.pack(request, VERSION | REPLY, len(reply)) + reply)
        return True


def _recv(conn: socket.socket, size: int) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    data, ancdata, _flags, _addr = conn.recvmsg(size, socket.CMSG_LEN(MAX_FDS * fds.itemsize))
    for level, kind, raw in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(raw[: len(raw) - (len(raw) % fds.itemsize)])
    return data, list(fds)


@contextmanager
def backend(path: str) -> Iterator[Backend]:
    """A backend listening on ``path`` for the time of the block."""
    served = Backend(path)
    served.start()
    try:
        yield served
    finally:
        served.close()


if __name__ == "__main__":
    with backend(sys.argv[1]) as b:
        b._thread.join()
        print(" ".join(b.requests))

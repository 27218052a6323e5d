"""Bytes between the processes of a job through host memory: a TCP star with process 0 as the hub.

Why not jax's collectives: ``multihost_utils.process_allgather`` moves bytes as a device array, so a
step's rollouts (token lists, trajectories, image files) landed replicated on every accelerator of
every host. Why not jax's coordination-service key-value store, which would move them through host
memory too: jax 0.10.2 reaches it only through ``jax._src`` (no public API), and the package reads no
private module. The star has the coordination service's own shape (process 0 holds it as well),
without its message-size limits, and no part of it touches a device.

Setup (:class:`HostExchange`, once per job, a collective): process 0 listens on an ephemeral port
and hands its addresses, the port and a random token to the others through ``bootstrap`` (in a run,
one small broadcast over jax's collectives, the only device traffic the exchange ever makes). Each
other process connects and both sides prove they hold the token (HMAC over a fresh nonce, so a
process that reached a stranger's port leaks nothing); then process 0 closes the listening socket.
The connections stay open for the job.

Each call is numbered, and every message carries its number and kind: processes that call the
exchange in different orders fail at once, naming both calls, instead of pairing the wrong messages.
A process that dies closes its connections, so the others raise ConnectionError at their next
call instead of waiting for a timeout.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import socket
import struct
import time
from typing import Callable, NoReturn, Sequence

_HEADER = struct.Struct("!QBQ")       # call number, kind, payload bytes
_GATHER, _BROADCAST = 1, 2
_KINDS = {_GATHER: "allgather", _BROADCAST: "broadcast"}
_NONCE = 16
_MAC = hashlib.sha256().digest_size
_RANK = struct.Struct("!I")
_CHUNK = 1 << 24                      # recv_into at most 16 MiB at a time


def _mac(token: bytes, *parts: bytes) -> bytes:
    return hmac.new(token, b"".join(parts), hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, _CHUNK))
        if k == 0:
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


def local_addresses() -> list[str]:
    """This host's IPv4 addresses, loopback first: a process on the same host connects at once,
    and on another host 127.0.0.1 is refused at once (or fails the token check) before the real
    ones are tried. Interfaces from the kernel (Linux), then whatever the host name resolves to."""
    found = ["127.0.0.1"]
    try:
        import fcntl
        siocgifaddr = 0x8915
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(probe.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
                except OSError:        # an interface without an IPv4 address
                    continue
                found.append(socket.inet_ntoa(packed[20:24]))
    except (ImportError, OSError):
        pass
    try:
        found += socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        pass
    found.append(socket.getfqdn())
    return list(dict.fromkeys(a for a in found if a))


class HostExchange:
    """All-gather and broadcast of bytes among ``process_count`` processes (module docstring).

    ``bootstrap(data)``: process 0 passes bytes, every process gets them back (a broadcast that
    exists before this one: jax's collectives in a run, a queue in a test).

    Every call starts with each other process sending process 0 a message (its part of a gather;
    an empty one before a broadcast), and process 0 reads them before it sends anything: so two
    processes at different calls never both wait to receive, and process 0 sees the mismatch."""

    def __init__(self, process_index: int, process_count: int, bootstrap: Callable[[bytes | None], bytes], *,
                 setup_timeout_s: float = 300.0, handshake_timeout_s: float = 10.0):
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.calls = 0
        self.moved_bytes = 0   # payload bytes of every call so far (every process's part of a gather)
        self._peers: dict[int, socket.socket] = {}
        self._broken = ""
        if self.process_count < 2:
            return
        deadline = time.monotonic() + setup_timeout_s
        if self.process_index == 0:
            self._serve(bootstrap, deadline, handshake_timeout_s)
        else:
            self._connect(bootstrap, deadline, handshake_timeout_s)

    # -- setup ------------------------------------------------------------------------------------
    def _serve(self, bootstrap, deadline: float, handshake_s: float) -> None:
        token = secrets.token_bytes(32)
        with socket.create_server(("0.0.0.0", 0), backlog=self.process_count) as listener:
            port = listener.getsockname()[1]
            bootstrap(json.dumps({"port": port, "hosts": local_addresses(), "token": token.hex()}).encode())
            while len(self._peers) < self.process_count - 1:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(1, self.process_count)) - set(self._peers))
                    self.close()
                    raise TimeoutError(f"host exchange: processes {missing} did not connect to process 0 on port "
                                       f"{port}")
                listener.settimeout(left)
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                rank = self._admit(conn, token, handshake_s)
                if rank is None:
                    conn.close()
                else:
                    self._peers[rank] = conn

    def _admit(self, conn: socket.socket, token: bytes, handshake_s: float) -> int | None:
        """The rank of a peer that proved it holds the token; None for anything else."""
        conn.settimeout(handshake_s)
        nonce = secrets.token_bytes(_NONCE)
        try:
            conn.sendall(nonce + _mac(token, b"hub", nonce))
            reply = _recv_exact(conn, _RANK.size + _MAC)
            rank_bytes, proof = bytes(reply[:_RANK.size]), bytes(reply[_RANK.size:])
            rank = _RANK.unpack(rank_bytes)[0]
            if not hmac.compare_digest(proof, _mac(token, b"peer", nonce, rank_bytes)) \
                    or not 0 < rank < self.process_count or rank in self._peers:
                return None
            conn.sendall(b"\x01")
        except OSError:
            return None
        conn.settimeout(None)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return rank

    def _connect(self, bootstrap, deadline: float, handshake_s: float) -> None:
        info = json.loads(bytes(bootstrap(None)).decode())
        token, port, hosts = bytes.fromhex(info["token"]), int(info["port"]), list(info["hosts"])
        rank_bytes = _RANK.pack(self.process_index)
        errors: dict[str, str] = {}
        while time.monotonic() < deadline:
            for host in hosts:
                try:
                    sock = socket.create_connection((host, port), timeout=min(handshake_s, 5.0))
                except OSError as exc:
                    errors[host] = f"{type(exc).__name__}: {exc}"
                    continue
                try:
                    sock.settimeout(handshake_s)
                    hello = _recv_exact(sock, _NONCE + _MAC)
                    nonce = bytes(hello[:_NONCE])
                    if not hmac.compare_digest(bytes(hello[_NONCE:]), _mac(token, b"hub", nonce)):
                        raise ConnectionError("another service answered (token check failed)")
                    sock.sendall(rank_bytes + _mac(token, b"peer", nonce, rank_bytes))
                    if _recv_exact(sock, 1) != b"\x01":
                        raise ConnectionError("process 0 refused the handshake")
                except OSError as exc:
                    errors[host] = f"{type(exc).__name__}: {exc}"
                    sock.close()
                    continue
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._peers[0] = sock
                return
            time.sleep(0.2)
        raise TimeoutError(f"host exchange: process {self.process_index} could not reach process 0 on port {port} "
                           f"at any of its addresses: {errors}")

    # -- messages ---------------------------------------------------------------------------------
    def _send(self, rank: int, kind: int, parts: Sequence[bytes]) -> None:
        sock = self._peers[rank]
        try:
            sock.sendall(_HEADER.pack(self.calls, kind, sum(len(p) for p in parts)))
            for p in parts:
                sock.sendall(p)
        except OSError as exc:
            self._fail(f"sending to process {rank} failed ({type(exc).__name__}: {exc}); it has probably exited")

    def _recv(self, rank: int, kind: int) -> bytearray:
        sock = self._peers[rank]
        try:
            call, got_kind, n = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
            if (call, got_kind) == (self.calls, kind):
                return _recv_exact(sock, n)
        except OSError as exc:
            self._fail(f"receiving from process {rank} failed ({type(exc).__name__}: {exc}); it has probably exited")
        self._fail(f"process {rank} is at call {call} ({_KINDS.get(got_kind, got_kind)}), process "
                   f"{self.process_index} at call {self.calls} ({_KINDS[kind]}): the processes called the "
                   f"exchange in different orders")

    def _fail(self, message: str) -> NoReturn:
        self._broken = message
        self.close()
        raise ConnectionError(f"host exchange: {message}")

    def _begin(self) -> None:
        if self._broken:
            raise ConnectionError(f"host exchange is closed after an earlier failure: {self._broken}")
        self.calls += 1

    # -- the collectives ----------------------------------------------------------------------------
    def allgather(self, data: bytes) -> list:
        """Every process's ``data``, in process order, on every process (bytes-like objects, which
        ``pickle.loads`` reads without a copy)."""
        self._begin()
        if self.process_count == 1:
            parts = [data]
        elif self.process_index == 0:
            parts = [data] + [self._recv(r, _GATHER) for r in range(1, self.process_count)]
            table = struct.pack(f"!{len(parts)}Q", *(len(p) for p in parts))
            for r in range(1, self.process_count):
                self._send(r, _GATHER, [table, *parts])
        else:
            self._send(0, _GATHER, [data])
            blob = memoryview(self._recv(0, _GATHER))
            sizes = struct.unpack_from(f"!{self.process_count}Q", blob)
            parts, at = [], 8 * self.process_count
            for n in sizes:
                parts.append(blob[at:at + n])
                at += n
        self.moved_bytes += sum(len(p) for p in parts)
        return parts

    def broadcast(self, data: bytes | None) -> bytes | bytearray:
        """Process 0's ``data`` on every process (the others pass None)."""
        self._begin()
        if self.process_count == 1 or self.process_index == 0:
            if data is None:
                raise ValueError("host exchange: process 0 must pass the bytes it broadcasts")
            for r in range(1, self.process_count):   # each says it is at this call (see the class docstring)
                self._recv(r, _BROADCAST)
            for r in range(1, self.process_count):
                self._send(r, _BROADCAST, [data])
            out = data
        else:
            self._send(0, _BROADCAST, [])
            out = self._recv(0, _BROADCAST)
        self.moved_bytes += len(out)
        return out

    def close(self) -> None:
        for sock in self._peers.values():
            try:
                sock.close()
            except OSError:
                pass
        self._peers.clear()

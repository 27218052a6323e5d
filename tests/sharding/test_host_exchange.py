"""The host exchange (genevolve_jax/sharding/host_exchange.py) among threads that stand in for
processes: all-gather and broadcast of ragged random bytes, processes that call it in different
orders, a process that exits, and a stranger that connects during setup. The exchange between two
real processes is tested in tests/sharding/test_multihost_evolve.py."""
import socket
import threading

import numpy as np
import pytest

from genevolve_jax.sharding.host_exchange import HostExchange, local_addresses


class Bootstrap:
    """The broadcast a run gets from jax's collectives: process 0's bytes, to every thread."""

    def __init__(self):
        self.ready = threading.Event()
        self.data = b""

    def __call__(self, data):
        if data is not None:
            self.data = data
            self.ready.set()
        assert self.ready.wait(30)
        return self.data


def run_processes(n: int, body, timeout_s: float = 60.0):
    """``body(exchange)`` on ``n`` threads, one exchange each; returns each thread's result or exception."""
    boot, results = Bootstrap(), [None] * n

    def one(rank):
        try:
            ex = HostExchange(rank, n, boot, setup_timeout_s=30)
            try:
                results[rank] = body(ex)
            finally:
                ex.close()
        except Exception as exc:     # noqa: BLE001 - handed to the test
            results[rank] = exc

    threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), "an exchange hung"
    return results


def test_allgather_and_broadcast_move_ragged_bytes_in_process_order():
    n, rng = 3, np.random.default_rng(0)
    sizes = [[int(rng.integers(0, 3 << 20)), 0, int(rng.integers(1, 50))] for _ in range(n)]   # MBs, empty, few
    payloads = [[rng.bytes(s) for s in row] for row in sizes]
    sent = rng.bytes(int(rng.integers(1, 1 << 20)))

    def body(ex):
        got = [[bytes(b) for b in ex.allgather(payloads[ex.process_index][k])] for k in range(3)]
        out = bytes(ex.broadcast(sent if ex.process_index == 0 else None))
        return got, out, ex.moved_bytes, ex.calls

    for got, out, moved, calls in run_processes(n, body):
        assert got == [[payloads[p][k] for p in range(n)] for k in range(3)]
        assert out == sent and calls == 4
        assert moved == sum(map(sum, sizes)) + len(sent)


def test_processes_that_call_in_different_orders_fail_naming_both_calls():
    def body(ex):
        if ex.process_index == 0:
            return ex.allgather(b"x")
        return ex.broadcast(None)

    got = run_processes(2, body)
    assert all(isinstance(r, ConnectionError) for r in got), got
    assert "called the exchange in different orders" in str(got[0]) and "(broadcast)" in str(got[0])


def test_a_process_that_exits_makes_the_others_raise_instead_of_waiting():
    def body(ex):
        ex.allgather(b"first")
        if ex.process_index == 2:
            return "gone"         # exits: its connection closes
        return ex.allgather(b"second")

    got = run_processes(3, body)
    assert got[2] == "gone"
    assert isinstance(got[0], ConnectionError) and "process 2" in str(got[0])
    assert isinstance(got[1], ConnectionError) and "process 0" in str(got[1])


def test_a_stranger_during_setup_is_turned_away_and_learns_no_token():
    boot = Bootstrap()
    seen = {}

    def stranger():
        import json
        info = json.loads(boot(None))
        with socket.create_connection(("127.0.0.1", info["port"]), timeout=10) as s:
            hello = b""
            while len(hello) < 48:            # nonce + the hub's proof
                hello += s.recv(48 - len(hello))
            s.sendall(b"\0" * 36)            # a wrong proof
            seen["reply"] = s.recv(1)         # the hub closes without its ack

    def hub():
        seen["hub"] = HostExchange(0, 2, boot, setup_timeout_s=30)

    threads = [threading.Thread(target=hub, daemon=True)]
    threads[0].start()
    stranger()
    peer = HostExchange(1, 2, boot, setup_timeout_s=30)
    threads[0].join(30)
    try:
        assert seen["reply"] == b""
        payloads = []
        t = threading.Thread(target=lambda: payloads.append(seen["hub"].allgather(b"hub")), daemon=True)
        t.start()
        assert [bytes(b) for b in peer.allgather(b"peer")] == [b"hub", b"peer"]
        t.join(30)
    finally:
        peer.close()
        seen["hub"].close()


def test_local_addresses_start_with_loopback():
    got = local_addresses()
    assert got[0] == "127.0.0.1" and len(got) == len(set(got))


def test_one_process_needs_no_peers():
    ex = HostExchange(0, 1, lambda data: pytest.fail("no bootstrap for one process"))
    assert [bytes(b) for b in ex.allgather(b"a")] == [b"a"] and bytes(ex.broadcast(b"b")) == b"b"

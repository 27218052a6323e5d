"""Seconds per all-gather of pickled bytes between two processes: the host exchange that rollouts take
(genevolve_jax/sharding/host_exchange.py) against the path they took before, jax's
``multihost_utils.process_allgather`` of the padded bytes (a device array on every device).

    python bench/host_exchange.py                          # 1, 16 and 64 MiB per process, 4 CPU devices each
    python bench/host_exchange.py --mib 4 --devices 8 --repeats 5

Two real processes on 127.0.0.1 (jax.distributed, gloo), planned as the two-process tests plan them.
Each row: the median over ``--repeats`` all-gathers of one random payload per process (sizes differ
by 10 % between the processes, as rollouts do), and for the device path the bytes it left on each
device while the gather ran (its output, replicated: padded size × processes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

# The two-process launcher comes from tests/fixtures, importable from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = textwrap.dedent('''
    import pickle, statistics
    from genevolve_jax.sharding import multihost

    sizes, repeats = json.loads(os.environ["BENCH_MIB"]), int(os.environ["BENCH_REPEATS"])

    def device_path(obj):
        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        n = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
        padded = np.zeros(int(n.max()), np.uint8)
        padded[:data.size] = data
        rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(n), -1)
        return [pickle.loads(rows[p, :int(k)].tobytes()) for p, k in enumerate(n)]

    multihost.host_exchange()
    rows = []
    for mib in sizes:
        payload = np.random.default_rng(rank).bytes(int(mib * (1 << 20) * (1.0 + 0.1 * rank)))
        row = {"mib": mib}
        for name, gather in (("host", multihost.allgather_objects), ("device", device_path)):
            gather(payload)             # warm: the device path compiles for each padded size
            times = []
            for _ in range(repeats):
                multihost.MultiProcess().barrier(f"{name}{mib}")
                t = time.perf_counter()
                got = gather(payload)
                times.append(time.perf_counter() - t)
            assert len(got) == 2 and got[rank] == payload
            row[name] = statistics.median(times)
        rows.append(row)
    if rank == 0:
        with open(os.path.join(out, "rows.json"), "w") as f:
            json.dump(rows, f)
''')


def main() -> None:
    from tests.fixtures.multiprocess import WORKER_PRELUDE, join_processes, launch_two_processes
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=float, nargs="+", default=[1, 16, 64])
    ap.add_argument("--devices", type=int, default=4, help="simulated CPU devices per process")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        env = {"BENCH_MIB": json.dumps(args.mib), "BENCH_REPEATS": str(args.repeats)}
        join_processes(launch_two_processes(out, WORKER_PRELUDE + WORKER, local_devices=args.devices,
                                            extra_env=env), timeout_s=1200)
        rows = json.loads((out / "rows.json").read_text())
    print("| MiB per process | host exchange s | MB/s | process_allgather s | MB/s | device bytes per device |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        total = r["mib"] * (1 << 20) * 2.1          # both processes' payloads
        print(f"| {r['mib']:g} | {r['host']:.3f} | {total / r['host'] / 1e6:,.0f} | {r['device']:.3f} | "
              f"{total / r['device'] / 1e6:,.0f} | {2 * r['mib'] * 1.1:.1f} MiB |")


if __name__ == "__main__":
    main()

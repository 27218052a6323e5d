"""Preemption: real SIGTERM / SIGINT delivered to real processes.

- a signal in the middle of a step lets that step finish, and ``should_stop`` answers True at the
  step boundary (the work of the step is complete, no later step starts), exit code 0;
- a second signal is not swallowed: SIGTERM kills, SIGINT raises KeyboardInterrupt, and the step
  they land in never completes;
- a signal inside ``abandonable`` drops the work at once: the code after it never runs;
- two processes over jax.distributed (gloo): a SIGTERM to one of them stops both at the same step.

Every check is on order and effect (which steps completed, what the process printed, how it
ended); the time limits below only stop a hung process, so that the suite cannot hang.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from genevolve_jax.train.runtime.preemption import PreemptionGuard, StepAbandoned
from tests.fixtures.multiprocess import WORKER_PRELUDE, join_processes, launch_two_processes

STEP_LOOP = textwrap.dedent('''
    import json, os, signal, sys, time
    from genevolve_jax.train.runtime.preemption import PreemptionGuard
    out, step_s, self_kill_at = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    record = {"completed": [], "stopped_at": None}
    with PreemptionGuard(agree=lambda flag: flag) as guard:
        for step in range(1, 1000):
            print("STEP", step, flush=True)
            t = time.time()
            while time.time() - t < step_s:      # the "work" of the step, interrupted by the signal
                if step == self_kill_at and time.time() - t > step_s / 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                    self_kill_at = -1
                sum(range(2000))
            record["completed"].append(step)     # the step finished whatever arrived meanwhile
            print("COMPLETED", step, flush=True)
            if guard.should_stop(step):
                record["stopped_at"] = guard.stop_step
                record["signal"] = guard.signal_name
                break
    json.dump(record, open(out, "w"))
    print("SAVED at step", record["stopped_at"], flush=True)
''')


def _run_loop(tmp_path, step_s=0.6, self_kill_at=-1, inherit_ignored_sigint=False):
    out = tmp_path / "record.json"
    # A child of a process that ignores SIGINT (nohup, some launchers, pytest-xdist workers)
    # starts with SIGINT ignored; the guard must still act on it. The child inherits SIG_IGN, and
    # a handler becomes SIG_DFL at exec: this process's disposition is set around the spawn either
    # way, so the test does not depend on how its own runner treats SIGINT (no preexec_fn: fork).
    disposition = signal.SIG_IGN if inherit_ignored_sigint else signal.default_int_handler
    previous = signal.signal(signal.SIGINT, disposition)
    try:
        proc = subprocess.Popen([sys.executable, "-c", STEP_LOOP, str(out), str(step_s), str(self_kill_at)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    return proc, out


HANG_GUARD_S = 300       # only stops a process that hangs; never what a test asserts


def _wait_for_line(stream, prefix, proc):
    """Read ``stream`` (the child's stdout or stderr) up to a line that starts with ``prefix``."""
    while True:
        line = stream.readline()
        if line.startswith(prefix):
            return line
        if not line and proc.poll() is not None:
            raise AssertionError(f"no line {prefix!r}; exit code {proc.returncode}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_step_finishes_the_step_then_stops(tmp_path, sig):
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    target = int(rng.integers(2, 4))
    proc, out = _run_loop(tmp_path)
    try:
        _wait_for_line(proc.stdout, f"STEP {target}", proc)
        time.sleep(float(rng.uniform(0.05, 0.3)))              # somewhere inside the step
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["stopped_at"] == target and record["completed"] == list(range(1, target + 1))
    assert record["signal"] == signal.Signals(sig).name
    assert f"received {signal.Signals(sig).name}" in stderr
    assert f"SAVED at step {target}" in stdout


def test_self_sent_sigterm_is_recorded(tmp_path):
    proc, out = _run_loop(tmp_path, step_s=0.3, self_kill_at=2)
    stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, stderr[-2000:]
    assert json.loads(out.read_text())["stopped_at"] == 2


@pytest.mark.parametrize("sig,ignored", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)])
def test_a_second_signal_stops_at_once(tmp_path, sig, ignored):
    """Step 1 is 30 s of work: the first signal is acknowledged and the process keeps working; the
    second ends it inside step 1, which never completes (were it swallowed, step 1 would complete,
    the guard would stop the loop there and the process would exit 0)."""
    proc, out = _run_loop(tmp_path, step_s=30.0, inherit_ignored_sigint=ignored)
    try:
        _wait_for_line(proc.stdout, "STEP 1", proc)
        time.sleep(0.2)
        proc.send_signal(sig)
        received = _wait_for_line(proc.stderr, "genevolve: received", proc)   # the guard's acknowledgement
        assert signal.Signals(sig).name in received
        assert proc.poll() is None                             # the first one waits for the step
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "COMPLETED" not in stdout and not out.exists()
    # SIGTERM: the default action; SIGINT: Python's KeyboardInterrupt, which, uncaught, ends the
    # process by SIGINT too (so a shell sees the interrupt).
    assert proc.returncode == -sig
    if sig == signal.SIGINT:
        # Ignored before the guard: the default action, no Python handler (no traceback).
        assert ("KeyboardInterrupt" in stderr) != ignored


def test_abandonable_work_is_dropped_on_a_signal_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    guard = PreemptionGuard(agree=lambda flag: flag)
    with guard:
        assert not guard.should_stop(1) and guard.stop_step is None
        work = []
        with pytest.raises(StepAbandoned, match="SIGTERM"):
            with guard.abandonable():
                work.append("started")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(20)                   # the handler raises in here: nothing below runs
                work.append("finished")
        assert work == ["started"]
        assert guard.requested and guard.should_stop(1) and guard.stop_step == 1
        with pytest.raises(StepAbandoned):       # already requested: nothing new starts
            with guard.abandonable():
                pass
    assert signal.getsignal(signal.SIGTERM) == before
    # Another process saw a signal: this one stops too, at the same step, without one of its own.
    other = PreemptionGuard(agree=lambda flag: True)
    assert not other.requested and other.should_stop(7) and other.stop_step == 7 and other.signal_name is None


TWO_PROCESS_WORKER = WORKER_PRELUDE + textwrap.dedent('''
    from genevolve_jax.train.runtime.preemption import PreemptionGuard

    guard = PreemptionGuard().install()
    completed = []
    for step in range(1, 200):
        # A step that needs both processes, and takes longer on process 0 so the signal lands in it.
        total = int(np.asarray(multihost_utils.process_allgather(np.asarray([step], np.int32))).sum())
        assert total == 2 * step
        time.sleep(0.3 if rank == 0 else 0.1)
        completed.append(step)
        if rank == 1 and step == 3:
            open(os.path.join(out, "ready"), "w").close()
        if guard.should_stop(step):
            break
    json.dump({"rank": rank, "completed": completed, "stop_step": guard.stop_step,
               "received": guard.signal_name}, open(os.path.join(out, f"record{rank}.json"), "w"))
''')


@pytest.mark.slow
def test_two_processes_agree_on_the_stop_step(tmp_path):
    procs = launch_two_processes(tmp_path, TWO_PROCESS_WORKER)
    try:
        hang_guard = time.monotonic() + HANG_GUARD_S
        while not (tmp_path / "ready").exists():
            exited = [p.communicate()[0][-3000:] for p in procs if p.poll() is not None]
            assert not exited, exited
            if time.monotonic() > hang_guard:
                pytest.fail(f"the workers did not reach step 3 in {HANG_GUARD_S} s (hung?)")
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)                   # only process 1 is preempted
    except BaseException:
        for p in procs:
            p.kill()
        raise
    join_processes(procs, timeout_s=HANG_GUARD_S)
    r0, r1 = (json.loads((tmp_path / f"record{r}.json").read_text()) for r in range(2))
    assert r1["received"] == "SIGTERM" and r0["received"] is None
    assert r0["stop_step"] == r1["stop_step"] >= 3
    assert r0["completed"] == r1["completed"] == list(range(1, r0["stop_step"] + 1))

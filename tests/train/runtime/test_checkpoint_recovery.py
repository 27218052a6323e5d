"""Checkpoints that cannot be trusted, with real faults:

- a process SIGKILLed in the middle of an orbax save leaves no step that lists or restores: the
  previous step restores with every value intact, and the same step number saves again;
- the newest step truncated, missing a file, or holding another tree: the resume logs the step
  and the reason, restores the previous good step, and sets the bad one aside;
- the HF export is written under a temporary name: an export killed midway (SIGKILL) or failing
  leaves the previous export whole.
"""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from genevolve_jax.models.hf_io import PARTIAL_SUFFIX, atomic_directory
from genevolve_jax.train.runtime.checkpoint import UNRESTORABLE_DIR, CheckpointError, TrainCheckpointer

SHARDING = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _tree(seed, n=5000):
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((n // 50, 50)).astype(np.float32), "b": rng.standard_normal(37).astype(np.float32)}
    opt = {"mu": rng.standard_normal((n // 50, 50)).astype(np.float32), "count": np.asarray(seed, np.int32)}
    return params, opt


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=SHARDING), tree)


def _equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _files(step_dir, under="params"):
    out = []
    for root, _, files in os.walk(os.path.join(step_dir, under)):
        out += [os.path.join(root, f) for f in files]
    return out


KILL_MID_SAVE = textwrap.dedent('''
    import sys, numpy as np, jax.numpy as jnp
    from genevolve_jax.train.runtime.checkpoint import TrainCheckpointer
    n = int(sys.argv[2])
    def tree(seed):
        rng = np.random.default_rng(seed)
        return ({"w": jnp.asarray(rng.standard_normal((n // 50, 50), dtype=np.float32)),
                 "b": jnp.asarray(rng.standard_normal(37, dtype=np.float32))},
                {"mu": jnp.asarray(rng.standard_normal((n // 50, 50), dtype=np.float32)), "count": jnp.asarray(seed)})
    ck = TrainCheckpointer(sys.argv[1], save_every=1, keep=3)
    p, o = tree(1)
    ck.save(1, p, o, {"note": "one"})
    ck.wait()
    print("SAVED 1", flush=True)
    p, o = tree(2)
    ck.save(2, p, o, {"note": "two"})
    ck.wait()
    print("SAVED 2", flush=True)
''')


def test_sigkill_in_the_middle_of_a_save_leaves_no_half_step(tmp_path):
    directory = tmp_path / "ck"
    n = 12_000_000          # ~100 MB of random float32 per save: the write takes a few hundred ms
    proc = subprocess.Popen([sys.executable, "-c", KILL_MID_SAVE, str(directory), str(n)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    killed_with = None
    try:
        assert proc.stdout.readline().startswith("SAVED 1")
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            tmp = [d for d in os.listdir(directory) if d.startswith("2.") and "tmp" in d]
            # Kill once step 2's array data has started to land in its temporary directory.
            if tmp and any("/d/" in f for f in _files(directory / tmp[0], "")):
                os.kill(proc.pid, signal.SIGKILL)
                killed_with = sorted(os.listdir(directory))
                break
            time.sleep(0.001)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and killed_with is not None, "the save finished before the kill"
    assert "2" not in killed_with and not (directory / "2").exists()

    ck = TrainCheckpointer(directory, save_every=1, keep=3)
    try:
        assert ck.all_steps() == [1] and ck.latest_step() == 1
        want_p = {"w": np.random.default_rng(1).standard_normal((n // 50, 50), dtype=np.float32),
                  "b": np.random.default_rng(1).standard_normal(37, dtype=np.float32)}
        r = ck.restore(_abstract(want_p), _abstract({"mu": want_p["w"], "count": np.asarray(1)}))
        assert r.step == 1 and r.skipped == [] and r.meta["note"] == "one"
        np.testing.assert_array_equal(np.asarray(r.params["w"]), want_p["w"])
        ck.save(2, r.params, r.opt_state, {"note": "again"})                  # the step number is free again
        ck.wait()
        assert ck.all_steps() == [1, 2]
        assert sorted(os.listdir(directory)) == ["1", "2"]                   # the half step was cleaned up
        again = ck.restore(_abstract(want_p), _abstract({"mu": want_p["w"], "count": np.asarray(1)}))
        assert again.step == 2 and again.meta["note"] == "again"
    finally:
        ck.close()


def _saved(directory, steps, trees=None):
    ck = TrainCheckpointer(directory, save_every=1, keep=5)
    trees = trees or {s: _tree(s) for s in steps}
    for s in steps:
        ck.save(s, *trees[s], {"note": f"step {s}"})
    ck.wait()
    return ck, trees


def _truncate_biggest(step_dir):
    biggest = max(_files(step_dir), key=os.path.getsize)
    size = os.path.getsize(biggest)
    with open(biggest, "r+b") as f:
        f.truncate(size // 3)


def _delete_meta(step_dir):
    os.remove(os.path.join(step_dir, "meta", "metadata"))


def _truncate_meta(step_dir):
    path = os.path.join(step_dir, "meta", "metadata")
    with open(path, "r+b") as f:
        f.truncate(3)


@pytest.mark.parametrize("damage,why", [(_truncate_biggest, "cannot be read"), (_delete_meta, "cannot be read"),
                                        (_truncate_meta, "or is damaged")])
def test_damaged_newest_step_is_reported_skipped_and_set_aside(tmp_path, caplog, damage, why):
    directory = tmp_path / "ck"
    ck, trees = _saved(directory, [1, 2, 3])
    ck.close()
    damage(str(directory / "3"))

    ck = TrainCheckpointer(directory, save_every=1, keep=5)
    try:
        assert ck.latest_step() == 3
        with caplog.at_level(logging.WARNING, logger="genevolve_jax.train.runtime.checkpoint"):
            r = ck.restore(_abstract(trees[1][0]), _abstract(trees[1][1]))
        assert r.step == 2 and r.meta["note"] == "step 2"
        _equal(r.params, trees[2][0])
        _equal(r.opt_state, trees[2][1])
        assert [s.step for s in r.skipped] == [3] and why in r.skipped[0].reason
        logged = "\n".join(rec.getMessage() for rec in caplog.records)
        assert "checkpoint step 3" in logged and why in logged and "trying step 2" in logged
        # Set aside with its reason, out of the listing: the resumed run saves step 3 afresh.
        moved = r.skipped[0].moved_to
        assert moved.startswith(str(directory / UNRESTORABLE_DIR)) and os.path.isdir(moved)
        assert why in open(os.path.join(moved, "REASON.txt")).read()
        assert ck.all_steps() == [1, 2]
        ck.save(3, r.params, r.opt_state, {"note": "step 3 again"})
        ck.wait()
        again = ck.restore(_abstract(trees[1][0]), _abstract(trees[1][1]))
        assert again.step == 3 and again.meta["note"] == "step 3 again" and again.skipped == []
    finally:
        ck.close()


def test_newest_step_with_another_tree_falls_back(tmp_path):
    directory = tmp_path / "ck"
    other = ({"w": np.ones((3, 3), np.float32)}, {"mu": np.ones(3, np.float32)})
    ck, trees = _saved(directory, [1, 2], trees={1: _tree(1), 2: other})
    ck.close()
    ck = TrainCheckpointer(directory, save_every=1, keep=5)
    try:
        r = ck.restore(_abstract(trees[1][0]), _abstract(trees[1][1]))
        assert r.step == 1 and [s.step for s in r.skipped] == [2] and "does not fit this run" in r.skipped[0].reason
        _equal(r.params, trees[1][0])
    finally:
        ck.close()


def test_every_step_damaged_names_each_and_an_asked_step_is_strict(tmp_path):
    directory = tmp_path / "ck"
    ck, trees = _saved(directory, [2, 4])
    ck.close()
    _truncate_biggest(str(directory / "4"))
    _delete_meta(str(directory / "2"))
    ck = TrainCheckpointer(directory, save_every=1, keep=5)
    try:
        with pytest.raises(CheckpointError, match=r"restores: step 4: cannot be read.*; step 2: cannot be read"):
            ck.restore(_abstract(trees[2][0]), _abstract(trees[2][1]))
        assert ck.all_steps() == [2, 4]                  # nothing is moved when nothing restored
        with pytest.raises(CheckpointError, match="checkpoint step 4 .* cannot be read"):
            ck.restore(_abstract(trees[2][0]), _abstract(trees[2][1]), step=4)
    finally:
        ck.close()


SLOW_EXPORT = textwrap.dedent('''
    import os, sys, time
    from genevolve_jax.models.hf_io import atomic_directory
    with atomic_directory(sys.argv[1]) as partial:
        for i in range(100):
            with open(os.path.join(partial, f"shard-{i}.bin"), "wb") as f:
                f.write(os.urandom(1 << 16))
            if i == 3:
                print("WRITING", flush=True)
            time.sleep(0.05)
''')


def _write_export(path, marker):
    with atomic_directory(path) as partial:
        with open(os.path.join(partial, "config.json"), "w") as f:
            json.dump({"marker": marker}, f)


def test_hf_export_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "hf_export"
    _write_export(path, "first")
    # Killed while writing the next export: the first one is untouched, no half directory is visible.
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("WRITING")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(os.listdir(path)) == ["config.json"]
    assert json.load(open(path / "config.json"))["marker"] == "first"
    assert os.path.isdir(str(path) + PARTIAL_SUFFIX)      # the debris is beside it, never in it
    # An error inside the block: the same, and the debris of the killed run is gone.
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(path) as partial:
            open(os.path.join(partial, "config.json"), "w").write("{")
            raise RuntimeError("disk full")
    assert json.load(open(path / "config.json"))["marker"] == "first"
    assert not os.path.exists(str(path) + PARTIAL_SUFFIX)
    _write_export(path, "second")
    assert json.load(open(path / "config.json"))["marker"] == "second"
    assert sorted(os.listdir(tmp_path)) == ["hf_export"]


def test_export_hf_of_a_model_goes_through_a_partial_directory(tmp_path):
    from genevolve_jax.models.hf_io import load_pretrained
    from genevolve_jax.train.runtime.checkpoint import export_hf
    from tests.fixtures.toy_task import toy_model

    model = toy_model(seed=5)
    path = tmp_path / "hf"
    written = export_hf(model, path, dtype="float32")
    assert sorted(os.listdir(tmp_path)) == ["hf"] and "config.json" in written
    back = load_pretrained(str(path))
    a = model.language_model.embed_tokens.embedding.get_value()
    b = back.language_model.embed_tokens.embedding.get_value()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

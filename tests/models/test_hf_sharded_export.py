"""The plan of an HF export that every process writes its share of (models/hf_sharded_export.py):
each tensor is written once, by one process, into one file; each process's tensors are a
contiguous run of the key map's order of about the same bytes; files stay under the shard limit
and are numbered in process order. The export itself is tested with two real processes in
tests/sharding/test_weight_stream.py."""
import numpy as np
import pytest

from genevolve_jax.models import hf_io
from genevolve_jax.models.hf_sharded_export import plan_export
from genevolve_jax.models.qwen3_vl import keymap
from tests.fixtures.toy_task import many_tensor_config


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_every_tensor_written_once_by_one_process_in_contiguous_runs(count):
    config = many_tensor_config(scan_layers=bool(np.random.default_rng().integers(2)))
    limit = int(np.random.default_rng().integers(20_000, 200_000))
    plan = plan_export(config, count, dtype="bfloat16", max_shard_bytes=limit)
    entries = keymap.key_entries(config)
    assert [e.hf for e in plan.entries] == [e.hf for e in entries]
    nbytes = [int(np.prod(e.hf_shape)) * 2 for e in entries]
    assert list(plan.owners) == sorted(plan.owners) and set(plan.owners) == set(range(count))
    for p in range(count):                      # balanced to within a tensor either side
        mine = sum(n for n, o in zip(nbytes, plan.owners) if o == p)
        assert abs(mine - sum(nbytes) / count) <= 2 * max(nbytes)
    written = [i for _, _, run in plan.files for i in run]
    assert written == list(range(len(entries)))     # each once, files in process order
    names = [name for name, _, _ in plan.files]
    assert names == hf_io.shard_file_names(len(names))
    for _, owner, run in plan.files:
        assert {plan.owners[i] for i in run} == {owner}
        assert sum(nbytes[i] for i in run) <= limit or len(run) == 1
    with pytest.raises(ValueError, match="export dtype"):
        plan_export(config, count, dtype="float16")

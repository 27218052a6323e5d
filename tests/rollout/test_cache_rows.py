"""RowPool (the JaxEngine's host-side slot table): prefix matching with images, placement in
waves, least-recently-used eviction and weight versions, against hand-worked cases."""
import numpy as np

from genevolve_jax.rollout.cache_rows import DEFER, RowPool, common_prefix, image_runs

IMG = 99


def test_image_runs_and_common_prefix():
    assert image_runs(np.array([1, IMG, IMG, 2, IMG, 3, IMG, IMG]), IMG) == [(1, 3), (4, 5), (6, 8)]
    assert image_runs(np.array([1, 2]), IMG) == []
    assert common_prefix(np.array([1, 2, 3]), np.array([1, 2, 4, 5])) == 2
    assert common_prefix(np.array([1, 2]), np.array([1, 2, 4])) == 2


def test_a_match_keeps_one_token_to_prefill_and_never_cuts_or_changes_an_image():
    pool = RowPool(4, IMG)
    row_tokens = [5, 6, IMG, IMG, IMG, 7, 8, 9]
    first = pool.place(row_tokens, [("a",)])
    pool.finish(first.slot, [10, 11])                # parks the prompt and the tokens fed back
    row = pool.rows[first.slot]
    assert pool.usable_prefix(np.array(row_tokens + [10, 11, 12]), [("a",)], row) == 10
    assert pool.usable_prefix(np.array(row_tokens), [("a",)], row) == 7       # one token left
    assert pool.usable_prefix(np.array(row_tokens), [("b",)], row) == 2       # other image content
    assert pool.usable_prefix(np.array([5, 6, IMG, IMG, 1]), [("a",)], row) == 2  # a shorter run
    assert pool.usable_prefix(np.array([4, 6]), [], row) == 0


def test_placement_waves_copies_and_lru_eviction():
    pool = RowPool(3, IMG)
    a = pool.place([1, 2, 3, 4], [])
    assert (a.slot, a.source, a.reuse) == (0, -1, 0)
    assert pool.place([1, 2, 3, 4], []) == DEFER       # its source is written in this wave
    assert pool.place([7, 8], []).slot == 1            # unrelated: a fresh row
    pool.begin_wave()
    b = pool.place([1, 2, 3, 4], [])                   # the group's copy of a live prefix
    assert (b.slot, b.source, b.reuse) == (2, 0, 3)
    assert pool.place([9], []) is None                 # every row is live or taken
    for slot, fed_back in ((0, [5]), (1, [6]), (2, [6])):
        pool.finish(slot, fed_back)
    assert pool.num_parked == 3 and pool.num_live == 0
    assert [list(r.tokens) for r in pool.rows] == [[1, 2, 3, 4, 5], [7, 8, 6], [1, 2, 3, 4, 6]]
    pool.begin_wave()
    c = pool.place([7, 8, 6, 1, 2], [])                # continues row 1 exactly: in place
    assert (c.slot, c.source, c.reuse, c.evicted) == (1, 1, 3, False)
    d = pool.place([50, 51], [])                       # no match: evicts the least recently used
    assert d.evicted and d.slot == 0 and pool.evictions == 1
    pool.finish(c.slot, None)                          # an aborted request leaves its row empty
    assert pool.rows[1] is None
    pool.new_version(1)                                # new weights: nothing parked survives
    assert pool.num_parked == 0
    pool.begin_wave()
    assert pool.place([1, 2, 3, 4, 6, 7], []).reuse == 0
    pool.finish(d.slot, [52])                          # a request of the old weights: not parked
    assert pool.rows[d.slot] is None


def test_reuse_off_never_matches():
    pool = RowPool(2, IMG, reuse=False)
    a = pool.place([1, 2, 3], [])
    pool.finish(a.slot, [4])
    assert pool.rows[a.slot] is None
    pool.begin_wave()
    assert pool.place([1, 2, 3, 4, 5], []).reuse == 0


def test_a_conversation_takes_its_own_row_over_when_another_row_matches_as_far():
    """A one-token turn parks a row that holds only the prompt, which a sibling rollout's row holds
    too: the next round takes its own row over instead of copying the sibling's prefix into a row it
    evicts."""
    pool = RowPool(2, IMG)
    first = pool.place([1, 2, 3], [])
    pool.begin_wave()
    sibling = pool.place([1, 2, 3], [])                # the group's copy
    assert (first.slot, sibling.slot, sibling.source) == (0, 1, 0)
    pool.finish(first.slot, [4, 5])                    # row 0 holds [1, 2, 3, 4, 5]
    pool.finish(sibling.slot, [])                      # row 1 holds the prompt only
    pool.begin_wave()
    nxt = pool.place([1, 2, 3, 9, 8], [])              # sibling's next round: matches both rows to 3
    assert (nxt.slot, nxt.source, nxt.reuse, nxt.evicted) == (1, 1, 3, False)
    assert pool.evictions == 0 and list(pool.rows[0].tokens) == [1, 2, 3, 4, 5]


def test_device_write_position_follows_prefill_and_decode_and_resets_on_placement():
    pool = RowPool(1, IMG)
    a = pool.place([1, 2, 3], [])
    pool.mark_prefilled(a.slot, 3)
    pool.mark_decoded(a.slot, 4)
    pool.mark_decoded(a.slot, 4)
    assert pool.device_length(a.slot) == 11           # past the tokens held: a chunk runs on after a stop
    pool.finish(a.slot, [7])
    pool.begin_wave()
    b = pool.place([1, 2, 3, 7, 6], [])
    assert (b.slot, b.reuse) == (a.slot, 4) and pool.device_length(b.slot) == 0

import json

import numpy as np
import pytest
import torch
from helpers import make_shards

from common.shards import ShardError, list_shards
from training.loader import ShardLoader


def _drain(loader, n):
    return [tuple(t.clone() for t in loader.next_batch()) for _ in range(n)]


def test_batches_match_build_nanogpt_layout(tmp_path):
    make_shards(tmp_path, [100, 1000], values="positions")
    ld = ShardLoader(str(tmp_path), "train", B=2, T=8, prefetch=False)
    x, y = ld.next_batch()
    assert x.dtype == torch.uint16 and x.shape == (2, 8)
    assert x.flatten().tolist() == list(range(16)) and y.flatten().tolist() == list(range(1, 17))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_striding_covers_each_token_once_per_epoch(tmp_path, world):
    B, T = 2, 8
    make_shards(tmp_path, [100, 1001, 700, 500], values="positions")
    loaders = [
        ShardLoader(str(tmp_path), "train", B, T, rank=r, world_size=world) for r in range(world)
    ]
    seen = {1: [], 2: [], 3: []}
    shard_slot = 0
    for _ in range(200):
        slot = loaders[0].slot
        epoch = loaders[0].epoch
        if epoch > 0:
            break
        for ld in loaders:
            x, _ = ld.next_batch()
            seen[slot + 1] += x.flatten().tolist()
        shard_slot = slot
    stride = B * T * world
    for shard, n in zip((1, 2, 3), (1001, 700, 500)):
        full = (
            (n - 1) // stride * stride
        )  # build-nanogpt drops the tail that cannot fill a whole step
        assert sorted(seen[shard]) == list(range(full)), shard
    assert shard_slot == 2 and loaders[0].epoch == 1  # wrapped into the next epoch
    for ld in loaders:
        ld.close()


@pytest.mark.parametrize("shuffle", [False, True])
def test_state_round_trips_across_shards_and_epochs(tmp_path, shuffle):
    make_shards(tmp_path, [100, 300, 250, 400])
    a = ShardLoader(str(tmp_path), "train", 2, 8, shuffle=shuffle, seed=3)
    for k in (0, 5, 17, 40):
        a2 = ShardLoader(str(tmp_path), "train", 2, 8, shuffle=shuffle, seed=3)
        _drain(a2, k)
        state = json.loads(
            json.dumps(a2.state_dict())
        )  # plain data: fits a weights_only checkpoint
        b = ShardLoader(str(tmp_path), "train", 2, 8, shuffle=shuffle, seed=3)
        b.load_state_dict(state)
        for (x1, y1), (x2, y2) in zip(_drain(a2, 25), _drain(b, 25)):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert a.state_dict()["epoch"] == 0


def test_shuffle_is_seeded_and_changes_the_order(tmp_path):
    make_shards(tmp_path, [100] + [200] * 5, values="positions")

    def first(seed, shuffle=True):
        ld = ShardLoader(str(tmp_path), "train", 2, 8, shuffle=shuffle, seed=seed)
        return [x.flatten().tolist() for x, _ in _drain(ld, 30)]

    assert first(1) == first(1)
    assert first(1) != first(2) and first(1) != first(0, shuffle=False)


def test_resume_on_another_world_size_continues_the_token_stream(tmp_path):
    make_shards(tmp_path, [100, 4000], values="positions")
    two = [ShardLoader(str(tmp_path), "train", 2, 8, rank=r, world_size=2) for r in range(2)]
    for ld in two:
        _drain(ld, 5)  # 5 steps x 32 tokens
    one = ShardLoader(str(tmp_path), "train", 2, 8, rank=0, world_size=1)
    one.load_state_dict(two[0].state_dict())
    x, _ = one.next_batch()
    assert x.flatten()[0].item() == 5 * 2 * 16


def test_folder_without_manifest_like_build_nanogpt_writes(tmp_path):
    make_shards(tmp_path, [100, 200, 300], manifest=False)
    assert [s.name for s in list_shards(str(tmp_path), "train")] == [
        "edufineweb_train_000001.npy",
        "edufineweb_train_000002.npy",
    ]
    assert list_shards(str(tmp_path), "val")[0].tokens is None


def test_corrupt_shard_is_rejected_naming_it(tmp_path):
    make_shards(tmp_path, [100, 300, 300])
    p = tmp_path / "edufineweb_train_000002.npy"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01
    p.write_bytes(bytes(data))
    ld = ShardLoader(str(tmp_path), "train", 2, 8, prefetch=False)
    with pytest.raises(ShardError, match="edufineweb_train_000002.npy.*sha256"):
        _drain(ld, 40)


def test_truncated_wrong_dtype_and_missing_shards_are_clear_errors(tmp_path):
    make_shards(tmp_path, [100, 300], manifest=False)
    p = tmp_path / "edufineweb_train_000001.npy"
    p.write_bytes(p.read_bytes()[:-50])
    with pytest.raises(ShardError, match="edufineweb_train_000001.npy.*truncated"):
        ShardLoader(str(tmp_path), "train", 2, 8)
    np.save(p, np.arange(300, dtype=np.int32))
    with pytest.raises(ShardError, match="edufineweb_train_000001.npy.*int32"):
        ShardLoader(str(tmp_path), "train", 2, 8)
    with pytest.raises(ShardError, match="no train shards"):
        list_shards(str(tmp_path / "empty"), "train")
    make_shards(tmp_path / "m", [100, 300])
    (tmp_path / "m" / "edufineweb_train_000001.npy").unlink()
    with pytest.raises(ShardError, match="missing"):
        ShardLoader(str(tmp_path / "m"), "train", 2, 8)


def test_shard_too_small_for_a_step(tmp_path):
    make_shards(tmp_path, [100, 30])
    with pytest.raises(ShardError, match="one step needs 33"):
        ShardLoader(str(tmp_path), "train", 2, 8, world_size=2)


def test_skip_passes_over_exactly_the_batches_reading_would(tmp_path):
    make_shards(tmp_path, [100, 300, 250, 400], values="positions")
    read = ShardLoader(str(tmp_path), "train", 2, 8, rank=1, world_size=2)
    skipped = ShardLoader(str(tmp_path), "train", 2, 8, rank=1, world_size=2)
    _drain(read, 23)  # across two shard boundaries
    skipped.skip(23)
    assert skipped.state_dict() == read.state_dict()
    for (x1, y1), (x2, y2) in zip(_drain(read, 5), _drain(skipped, 5)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_a_token_id_past_the_vocabulary_is_bad_data_named_by_shard_and_offset(tmp_path):
    """50257..50303 are the padded rows of the embedding: a model reads them without error and trains to a
    non-finite loss. The loader names them as what they are when it reads their shard."""
    from common.shards import write_manifest, write_shard

    val, train = np.zeros(300, np.uint16), np.full(1000, 17, np.uint16)
    train[612] = 50300
    write_manifest(
        str(tmp_path), [write_shard(str(tmp_path), i, t) for i, t in enumerate((val, train))]
    )
    ShardLoader(str(tmp_path), "train", 2, 8)  # without a vocabulary to hold it to: read as it is
    with pytest.raises(
        ShardError, match=r"shard \S+_train_000001\.npy holds token id 50300 at offset 612"
    ):
        ShardLoader(str(tmp_path), "train", 2, 8, vocab_size=50257)


@pytest.mark.parametrize(
    "shards",
    [
        '"no list"',
        '[["edufineweb_val_000000.npy", 300]]',
        '[{"name": "../../etc/passwd", "tokens": 300}]',
        '[{"name": "edufineweb_val_000000.npy", "tokens": "300"}]',
    ],
)
def test_a_shard_manifest_of_the_wrong_shape_is_one_clear_error(tmp_path, shards):
    make_shards(tmp_path, [300, 1000])
    (tmp_path / "manifest.json").write_text('{"shards": ' + shards + "}")
    with pytest.raises(ShardError, match="unreadable shard manifest"):
        list_shards(str(tmp_path), "train")


# ----------------------------------------------------------------------------- document-aligned rows

EOT = 50256


def _doc_shards(root, shards: int = 3, docs: int = 60, seed: int = 0):
    """Shards of documents, each an end-of-text and 1-40 tokens below it (the val shard first)."""
    from common.shards import write_manifest, write_shard

    rng = np.random.default_rng(seed)
    records = []
    for i in range(shards):
        parts = [
            np.concatenate([[EOT], rng.integers(0, EOT, rng.integers(1, 41))]) for _ in range(docs)
        ]
        records.append(write_shard(str(root), i, np.concatenate(parts).astype(np.uint16)))
    write_manifest(str(root), records)
    return str(root)


def test_aligned_rows_start_at_documents_and_ranks_split_a_step_as_one_rank_reads_it(tmp_path):
    url = _doc_shards(tmp_path)
    B, T = 2, 16
    one = ShardLoader(url, "train", 2 * B, T, align_docs=True, prefetch=False)
    ranks = [
        ShardLoader(url, "train", B, T, rank=r, world_size=2, align_docs=True, prefetch=False)
        for r in range(2)
    ]
    for _ in range(30):  # across shards and into the next epoch
        x, y = one.next_batch()
        assert (x[:, 0] == EOT).all() and torch.equal(x[:, 1:], y[:, :-1])
        parts = [ld.next_batch() for ld in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert one.epoch >= 1


def test_aligned_state_round_trips_and_resumes_on_another_world_size(tmp_path):
    url = _doc_shards(tmp_path)
    straight = ShardLoader(url, "train", 4, 16, align_docs=True)
    expect = [straight.next_batch()[0] for _ in range(20)]
    first = ShardLoader(url, "train", 4, 16, align_docs=True)
    for _ in range(7):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    again = ShardLoader(url, "train", 4, 16, align_docs=True)
    again.load_state_dict(state)
    assert all(torch.equal(again.next_batch()[0], e) for e in expect[7:])
    halves = [ShardLoader(url, "train", 2, 16, r, 2, align_docs=True) for r in range(2)]
    for ld in halves:
        ld.load_state_dict(state)
    for e in expect[7:]:
        assert torch.equal(torch.cat([ld.next_batch()[0] for ld in halves]), e)


def test_aligned_optimizer_steps_hold_the_same_rows_at_any_world_size_and_micro_batch(tmp_path):
    """An optimizer step of 8 rows read as 8 micro-steps of 1 row, 4 of 2, or 2 ranks x 2 of 2: the same rows,
    across shard ends too (a step that would not fit whole in a shard starts in the next)."""
    url = _doc_shards(tmp_path, docs=25)

    def steps(B, world, n=12):
        loaders = [
            ShardLoader(url, "train", B, 16, r, world, align_docs=True, step_rows=8)
            for r in range(world)
        ]
        out = []
        for _ in range(n):
            rows = []
            for _ in range(8 // (B * world)):
                rows += [ld.next_batch()[0] for ld in loaders]
            out.append(sorted(map(tuple, torch.cat(rows).tolist())))
        return out

    assert steps(1, 1) == steps(2, 1) == steps(2, 2) == steps(4, 2)


def test_an_aligned_run_does_not_resume_a_plain_one_and_needs_documents_to_align_to(tmp_path):
    url = _doc_shards(tmp_path)
    plain = ShardLoader(url, "train", 2, 16)
    plain.next_batch()
    with pytest.raises(ShardError, match="set data.align_docs as the run had it"):
        ShardLoader(url, "train", 2, 16, align_docs=True).load_state_dict(plain.state_dict())
    none = tmp_path / "no-docs"
    make_shards(none, [100, 1000], values="positions")
    with pytest.raises(ShardError, match="no room for one step of document-aligned rows"):
        ShardLoader(str(none), "train", 2, 16, align_docs=True)
    with pytest.raises(ValueError, match="no shuffling"):
        ShardLoader(url, "train", 2, 16, align_docs=True, shuffle=True)


def test_aligned_rows_over_documents_much_longer_than_a_row_say_how_little_they_read(
    tmp_path, caplog
):
    from common.shards import write_manifest, write_shard

    rng = np.random.default_rng(0)
    records = []
    for i in range(2):  # documents of 200 tokens in rows of 17: at most 9% of the text is read
        docs = [np.concatenate([[EOT], rng.integers(0, EOT, 199)]) for _ in range(10)]
        records.append(write_shard(str(tmp_path), i, np.concatenate(docs).astype(np.uint16)))
    write_manifest(str(tmp_path), records)
    with caplog.at_level("WARNING", logger="training.loader"):
        ShardLoader(str(tmp_path), "train", 2, 16, align_docs=True, prefetch=False)
        ShardLoader(str(tmp_path), "train", 2, 16, prefetch=False)  # the plain stream reads it all
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "read at most 8% of shard" in said[0]
    assert "data.align_docs=false" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="training.loader"):  # documents about a row long: quiet
        ShardLoader(
            _doc_shards(tmp_path / "short"), "train", 2, 16, align_docs=True, prefetch=False
        )
    assert not caplog.records

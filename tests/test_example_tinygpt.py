"""In-process checks of examples/tinygpt.py: the model half of the prefill/decode example."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import paged_kv
import tinygpt

PROMPTS = ["Hello, world", "a", "Ünïcødé ✓", "The quick brown fox jumps over the lazy dog. " * 4]


@pytest.fixture(scope="module")
def model() -> object:
    return tinygpt.build_model("cpu", seed=0)


def test_same_seed_same_weights_and_rng_untouched(model: object) -> None:
    torch.manual_seed(1234)
    expected_next = torch.rand(1)
    torch.manual_seed(1234)
    other = tinygpt.build_model("cpu", seed=0)
    assert torch.rand(1).item() == expected_next.item()  # caller's RNG stream not consumed
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    different = tinygpt.build_model("cpu", seed=1)
    assert not torch.equal(next(model.parameters()), next(different.parameters()))


def test_tokenizer_round_trip() -> None:
    tok = tinygpt.ByteTokenizer()
    text = "héllo ✓\n"
    ids = tok.encode(text)
    assert all(0 <= i < tinygpt.VOCAB_SIZE for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"  # invalid UTF-8 is replaced, not raised


@pytest.mark.parametrize("prompt", PROMPTS)
def test_decode_from_transferred_cache_equals_single_process(model: object, prompt: str) -> None:
    tok = tinygpt.ByteTokenizer()
    expected = tinygpt.generate(model, tok, prompt, 40)
    assert len(tok.encode(expected)) == 40

    cache, first = tinygpt.prefill(model, tok.encode(prompt))
    bundle = tinygpt.kv_to_bundle(cache, first)
    # What the pipe delivers: fresh, contiguous copies, unrelated to the sender's storage.
    received = {name: t.clone() for name, t in bundle.items()}
    del cache, bundle

    assert received["k0"].shape[-2] == len(tok.encode(prompt))
    assert tinygpt.bundle_nbytes(received) == sum(t.nbytes for t in received.values())
    cache2, first2 = tinygpt.bundle_to_kv(received)
    assert first2 == first
    assert tok.decode(tinygpt.decode(model, cache2, first2, 40)) == expected


def test_bundle_layout(model: object) -> None:
    cache, first = tinygpt.prefill(model, [1, 2, 3])
    bundle = tinygpt.kv_to_bundle(cache, first)
    n_layer = model.config.n_layer
    assert set(bundle) == {f"{kv}{i}" for i in range(n_layer) for kv in "kv"} | {"next_token"}
    assert all(t.is_contiguous() for t in bundle.values())
    assert bundle["next_token"].dtype == torch.int64 and bundle["next_token"].shape == (1,)


def test_prompts_give_distinct_outputs(model: object) -> None:
    # The e2e test relies on this to detect two requests' KV caches being swapped.
    tok = tinygpt.ByteTokenizer()
    outs = {tinygpt.generate(model, tok, f"request {i}: hello", 16) for i in range(20)}
    assert len(outs) == 20


def test_no_deprecated_cache_argument(model: object) -> None:
    # transformers 5.x deprecates forward(past_key_values=...) (gone in 5.40): the example
    # must use the argument the installed version offers, without a FutureWarning.
    import warnings

    tok = tinygpt.ByteTokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        cache, first = tinygpt.prefill(model, tok.encode("Hi"))
        tinygpt.decode(model, cache, first, 3)


def test_layer_streaming_cache_reports_each_layer_once_in_order_with_its_final_kv(
    model: object,
) -> None:
    tok = tinygpt.ByteTokenizer()
    reported: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    cache, first = tinygpt.prefill(
        model, tok.encode("stream me"),
        tinygpt.LayerStreamingCache(lambda i, k, v: reported.append((i, k.clone(), v.clone()))))
    plain, plain_first = tinygpt.prefill(model, tok.encode("stream me"))
    assert first == plain_first
    assert [i for i, _, _ in reported] == list(range(model.config.n_layer))
    for (i, k, v), (pk, pv) in zip(reported, tinygpt._layer_kv(plain), strict=True):
        assert torch.equal(k, pk) and torch.equal(v, pv), i


@pytest.mark.parametrize("prompt", PROMPTS)
def test_kv_through_two_paged_pools_decodes_as_single_process(model: object, prompt: str
                                                              ) -> None:
    """What the servers do: prefill into one pool's blocks layer by layer, blocks copied to
    other ids of another pool (the pipe's job), decoding from a cache read out of those."""
    tok = tinygpt.ByteTokenizer()
    ids = tok.encode(prompt)
    src = paged_kv.PagedKV(model.config, 64)
    dst = paged_kv.PagedKV(model.config, 40)
    dst.allocator.allocate(3)  # so the two ends' ids differ
    src_ids = src.allocator.allocate(src.blocks_for(len(ids)))
    dst_ids = dst.allocator.allocate(len(src_ids))[::-1]
    _, first = tinygpt.prefill(
        model, ids, tinygpt.LayerStreamingCache(lambda i, k, v: src.write_layer(i, src_ids, k, v)))
    for layer in range(model.config.n_layer):
        dst.pool.tensors[layer][:, dst_ids] = src.pool.tensors[layer][:, src_ids]
    text = tok.decode(tinygpt.decode(model, dst.to_cache(dst_ids, len(ids)), first, 40))
    assert text == tinygpt.generate(model, tok, prompt, 40)


def test_block_allocator_is_all_or_nothing_and_refuses_double_frees() -> None:
    alloc = paged_kv.BlockAllocator(4)
    a = alloc.allocate(3)
    with pytest.raises(paged_kv.OutOfBlocks):
        alloc.allocate(2)
    assert alloc.num_free == 1  # the refused allocation took nothing
    alloc.free(a[:1])
    with pytest.raises(ValueError):
        alloc.free(a[:1])  # a double free would hand one block to two requests
    with pytest.raises(ValueError):
        alloc.free([a[1], a[1]])
    assert alloc.num_free == 2
    alloc.free(a[1:])
    assert alloc.num_free == 4 and sorted(alloc.allocate(4)) == [0, 1, 2, 3]


def test_write_layer_fills_only_the_named_blocks(model: object) -> None:
    kv = paged_kv.PagedKV(model.config, 8)
    cfg = model.config
    keys = torch.randn(1, cfg.n_head, 20, cfg.n_embd // cfg.n_head)
    kv.write_layer(1, [6, 2], keys, -keys)
    t = kv.pool.tensors[1]
    assert not t[:, [0, 1, 3, 4, 5, 7]].any() and not kv.pool.tensors[0].any()
    assert not t[:, 2, 4:].any()  # the last block's spare slots are zeros
    k, v = kv.read_layer(1, [6, 2], 20)
    assert torch.equal(k, keys) and torch.equal(v, -keys)
    with pytest.raises(ValueError):
        kv.write_layer(1, [6, 2, 3], keys, keys)  # 20 tokens do not fill 3 blocks of 16

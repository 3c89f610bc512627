"""In-process checks of examples/tinygpt.py: the model half of the prefill/decode example."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
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

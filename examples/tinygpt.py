"""A tiny GPT-2 with a real KV cache, shared by the prefill and decode servers.

Contract:

* :func:`build_model` returns the *same* weights in every process for the same ``seed`` (random
  init under a fixed seed; nothing is downloaded), so a KV cache computed by one process is valid
  input for another.
* :class:`ByteTokenizer` maps UTF-8 bytes 0-255 to token ids 0-255 and back.
* :func:`prefill` runs the prompt and returns its KV cache plus the first generated token; given
  a :class:`LayerStreamingCache` it reports each layer's KV the moment that layer wrote it (what
  lets a prefill server stream layer by layer); :func:`decode` continues greedy generation
  from a cache. :func:`kv_to_bundle` / :func:`bundle_to_kv` turn a cache into a
  ``dict[str, Tensor]`` and back (loose tensors, for tests and checks).
* :func:`generate` is the single-process reference: ``prefill`` then ``decode`` with no transfer.
  Generation split across processes must produce exactly the same tokens.

All model calls are synchronous and compute-bound; servers run them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

__all__ = [
    "MAX_POSITIONS",
    "MODELS",
    "NEXT_TOKEN_KEY",
    "VOCAB_SIZE",
    "ByteTokenizer",
    "LayerStreamingCache",
    "build_model",
    "bundle_nbytes",
    "bundle_to_kv",
    "decode",
    "generate",
    "kv_to_bundle",
    "prefill",
]

VOCAB_SIZE = 256
MAX_POSITIONS = 1024  # context length: prompt tokens + generated tokens must fit
NEXT_TOKEN_KEY = "next_token"

# Greedy decoding only ever picks printable ASCII (plus newline) so results tables stay readable;
# the model itself still sees and scores all 256 byte tokens.
_ALLOWED_IDS = [10, *range(32, 127)]

#: The ``forward()`` argument (and output field) holding the KV cache: ``cache`` in
#: transformers 5.x, which deprecates ``past_key_values`` (removed in 5.40); older releases
#: know only ``past_key_values``.
_CACHE_ARG = ("cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters
              else "past_key_values")


#: Model shapes both servers can build (``--model``): ``tiny`` for tests and the demo, ``gpt2``
#: GPT-2 small's shape (12 layers, 12 heads, 768 wide; random weights) for timing figures.
MODELS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 4, "n_head": 4, "n_embd": 128},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},
}


class ByteTokenizer:
    """Byte-level tokenizer: token id == UTF-8 byte value (0-255). Stateless."""

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as token ids."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Bytes back to text; invalid UTF-8 becomes U+FFFD rather than an error."""
        return bytes(ids).decode("utf-8", errors="replace")


def build_model(
    device: str | torch.device = "cpu",
    *,
    seed: int = 0,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    n_positions: int = MAX_POSITIONS,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2, identical for identical arguments, in eval mode on ``device``.

    Weights are created on the CPU under ``seed`` (the caller's global RNG state is left as it
    was) and then moved, so every device gets bit-identical parameters.
    """
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        # Larger than GPT-2's 0.02 so the random model's output depends visibly on the prompt.
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.to(device)  # type: ignore[arg-type]  # transformers' decorator confuses mypy here
    model.train(False)  # eval mode (dropout off); nn.Module.eval() is untyped for mypy
    return model


def _greedy(logits: torch.Tensor) -> int:
    """The allowed token with the highest logit at the last position of a [1, seq, vocab] batch."""
    last = logits[0, -1]
    allowed = torch.tensor(_ALLOWED_IDS, device=last.device)
    return int(allowed[torch.argmax(last.index_select(0, allowed))].item())


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class LayerStreamingCache(DynamicCache):
    """A ``DynamicCache`` that calls ``on_layer(layer_idx, keys, values)`` as soon as a layer's
    attention has written its KV during a forward pass (keys/values: ``[batch, heads, seq,
    head_dim]``), before the next layer runs.

    The callback runs in the thread running the forward, inside it: it should be short (copy
    the tensors somewhere, hand work to an event loop); what it raises aborts the forward.
    Attention layers call ``update()`` once per forward, so a prefill reports each layer once.
    """

    def __init__(self, on_layer: Callable[[int, torch.Tensor, torch.Tensor], None]) -> None:
        super().__init__()
        self._on_layer = on_layer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
        *args: Any, **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._on_layer(layer_idx, keys, values)
        return keys, values


@torch.inference_mode()
def prefill(
    model: GPT2LMHeadModel, ids: list[int], cache: DynamicCache | None = None
) -> tuple[DynamicCache, int]:
    """Run the whole prompt once; return its KV cache (``len(ids)`` positions) and the greedy
    next token. ``ids`` must be non-empty. ``cache``: an empty cache to fill (a
    :class:`LayerStreamingCache`, say); default a fresh ``DynamicCache``."""
    if not ids:
        raise ValueError("prefill needs at least one token")
    input_ids = torch.tensor([ids], dtype=torch.long, device=_device_of(model))
    out = model(input_ids=input_ids, use_cache=True,
                **{_CACHE_ARG: DynamicCache() if cache is None else cache})
    return getattr(out, _CACHE_ARG), _greedy(out.logits)


@torch.inference_mode()
def decode(
    model: GPT2LMHeadModel,
    cache: DynamicCache,
    first_token: int,
    max_tokens: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[int]:
    """Greedy generation continuing from ``cache`` whose next token is ``first_token``.

    Returns ``max_tokens`` tokens, ``first_token`` first -- fewer if ``should_stop()`` turns
    true (checked before each step: how a server stops the thread of an abandoned request).
    ``cache`` is extended in place and must live on the model's device.
    """
    if max_tokens <= 0:
        return []
    device = _device_of(model)
    tokens = [first_token]
    while len(tokens) < max_tokens and not should_stop():
        step = torch.tensor([[tokens[-1]]], dtype=torch.long, device=device)
        out = model(input_ids=step, use_cache=True, **{_CACHE_ARG: cache})
        cache = getattr(out, _CACHE_ARG)
        tokens.append(_greedy(out.logits))
    return tokens


def generate(model: GPT2LMHeadModel, tokenizer: ByteTokenizer, prompt: str, max_tokens: int) -> str:
    """Single-process reference: what prefill -> transfer -> decode must reproduce exactly."""
    cache, first = prefill(model, tokenizer.encode(prompt))
    return tokenizer.decode(decode(model, cache, first, max_tokens))


def _layer_kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer, across transformers' cache layouts."""
    c: Any = cache  # the layout depends on the transformers version
    if hasattr(c, "layers"):  # transformers >= 4.56: one CacheLayer object per layer
        return [(layer.keys, layer.values) for layer in c.layers]
    return list(zip(c.key_cache, c.value_cache, strict=True))  # older: parallel lists


def kv_to_bundle(cache: DynamicCache, next_token: int) -> dict[str, torch.Tensor]:
    """The cache as one flat message: ``k0, v0, k1, v1, ...`` (each [1, heads, seq, head_dim])
    plus ``next_token`` (int64, shape [1]). Tensors are made contiguous here so the pipe sends
    them without another copy; the cache itself is not modified."""
    bundle: dict[str, torch.Tensor] = {}
    for i, (k, v) in enumerate(_layer_kv(cache)):
        bundle[f"k{i}"] = k.contiguous()
        bundle[f"v{i}"] = v.contiguous()
    device = bundle["k0"].device if bundle else torch.device("cpu")
    bundle[NEXT_TOKEN_KEY] = torch.tensor([next_token], dtype=torch.long, device=device)
    return bundle


def bundle_to_kv(bundle: dict[str, torch.Tensor]) -> tuple[DynamicCache, int]:
    """Inverse of :func:`kv_to_bundle`: a fresh cache holding the bundle's tensors (not copied)
    and the next token. Raises ``KeyError`` if layers are missing."""
    n_layers = sum(1 for name in bundle if name.startswith("k") and name[1:].isdigit())
    cache = DynamicCache()
    for i in range(n_layers):
        # update() on an empty layer stores the tensors as the layer's whole history.
        cache.update(bundle[f"k{i}"], bundle[f"v{i}"], i)
    return cache, int(bundle[NEXT_TOKEN_KEY].item())


def bundle_nbytes(bundle: dict[str, torch.Tensor]) -> int:
    """Payload size of a bundle in bytes (what the pipe moves)."""
    return sum(t.numel() * t.element_size() for t in bundle.values())

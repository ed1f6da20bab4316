"""A1111's prompt conditioning outside the WebUI: the chunks, emphasis and towers the WebUI uses,
so that a standalone composition conditions its rows as the WebUI would and CLoRA's token
positions (:mod:`lib_loraclr.clora.tokens`) index the same context rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lib_loraclr.clora.tokens import CHUNK, TokenCounter, tokenize_prompt, tokenizer_counter
from lib_loraclr.sd.cond import Cond


def encode_weighted(
    model: Any,
    texts: Sequence[str],
    counter: TokenCounter | None = None,
    comma_backtrack: int = 20,
    *,
    size: tuple[int, int] | None = None,
    negatives: int = 0,
) -> Cond:
    """The WebUI's conditioning outside the WebUI: a context ``(len(texts), 77 * chunks, ctx)`` and
    the family's other UNet inputs, built from the tokens of :mod:`lib_loraclr.clora.tokens` that
    the plan indexes. 75-token chunks (``BREAK``, comma backtrack) each framed by start/end tokens
    and encoded on their own, every tower of the family on the same tokens; emphasis applied as
    A1111 does, tower by tower (scale each token's vector, then restore the chunk's mean; per row
    here, A1111 takes the mean over its batch); shorter prompts padded with empty chunks (A1111's
    pad_cond_uncond); a pooled vector from the first chunk, unweighted, as A1111 takes it; the
    picture's ``size`` (height, width) where the family conditions on it. The last ``negatives``
    rows are negative prompts: where the family says so (SDXL), an empty one's text parts are
    zeros, as A1111 makes them."""
    counter = counter or tokenizer_counter(model.tokenizer)
    bos, eos = model.tokenizer.bos_token_id, model.tokenizer.eos_token_id
    tokenized = [tokenize_prompt(t, counter.ids, comma_backtrack).chunks for t in texts]
    device = model.device
    contexts, pooled = [], None
    for c in range(max(len(chunks) for chunks in tokenized)):
        ids, weights = [], []
        for chunks in tokenized:
            chunk = chunks[c] if c < len(chunks) else ()
            pad = CHUNK - len(chunk)
            ids.append([bos, *(i for i, _ in chunk), *([eos] * (pad + 1))])
            weights.append([1.0, *(w for _, w in chunk), *([1.0] * (pad + 1))])
        hidden, chunk_pooled = model.tower_states(torch.tensor(ids, device=device))
        w = torch.tensor(weights, device=device, dtype=hidden[0].dtype)
        contexts.append(torch.cat([_emphasised(z, w) for z in hidden], dim=-1))
        pooled = chunk_pooled if c == 0 else pooled
    context = torch.cat(contexts, dim=1)
    extra = model.vector_parts(pooled, len(texts), size)
    if model.family.zero_empty_negative and negatives:
        empty = torch.tensor([i >= len(texts) - negatives and t == "" for i, t in enumerate(texts)])
        context = context.masked_fill(empty.to(device)[:, None, None], 0)
        if "text_embeds" in extra:
            extra["text_embeds"] = extra["text_embeds"].masked_fill(empty.to(device)[:, None], 0)
    return Cond(context, extra)


def _emphasised(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's original emphasis on one tower's chunk: scale each token, restore each row's mean."""
    if not bool((weights != 1).any()):
        return z
    before = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[..., None]
    return z * (before / z.mean(dim=(1, 2), keepdim=True))

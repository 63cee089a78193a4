"""Long-prompt encoding: a report of any length -> CLIP windows -> one embedding sequence.

CLIP's text encoder reads 77 positions (BOS + 75 tokens + EOS). A MIMIC report with findings and
impression often runs past that, and cutting it drops the impression, the line that says what the
image must show. The scheme most SD front-ends use instead: split the token ids into windows of 75,
wrap each in BOS/EOS, encode each window on its own and concatenate the hidden states along the
sequence axis; the UNet's cross-attention accepts any key length. A prompt that fits one window gives
exactly the ids (and so the embedding) of the stock pipeline.

Pairs that go through one UNet call (conditional + unconditional) must have equal length: the
shorter is padded with windows of the empty prompt's embedding. For the usual empty negative prompt
this changes nothing but rounding, since attention over k copies of the same keys equals attention
over one copy; padded real text is masked out of cross-attention (`key_mask`), in training and in
the sampler.

diffusers users feed the same tensors to a stock pipeline with
`pipe(prompt_embeds=cond, negative_prompt_embeds=uncond)` (see `pipeline_embeds`)."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .token_count import DEFAULT_MAX_WINDOWS, WINDOW, WINDOW_LEN, TokenCount, count_tokens  # noqa: F401


def window_ids(tokenizer: Any, text: str, max_windows: int | None = None) -> torch.Tensor:
    """(W, 77) token ids: the prompt's tokens in windows of 75, each as BOS + tokens + EOS + padding.

    `max_windows` caps W (tokens past the cap are dropped: fit the text first with
    `cxrcommon.reports.fit_windows`, which cuts by salience and says so)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    chunks = [ids[i:i + WINDOW] for i in range(0, len(ids), WINDOW)] or [[]]
    if max_windows is not None:
        chunks = chunks[:max(1, max_windows)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [[tokenizer.bos_token_id, *c, tokenizer.eos_token_id] + [pad] * (WINDOW - len(c)) for c in chunks]
    return torch.tensor(rows, dtype=torch.long)


def encode_windows(text_encoder: Any, ids: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """(..., W, 77) ids -> (..., W*77, D) hidden states; windows are encoded as independent rows.
    `device`: where the ids go (default: the encoder's weights; a pipeline's `_execution_device` under
    CPU offload)."""
    lead, (w, n) = ids.shape[:-2], ids.shape[-2:]
    device = device or next(text_encoder.parameters()).device
    hidden = text_encoder(ids.reshape(-1, n).to(device))[0]
    return hidden.reshape(*lead, w * n, hidden.shape[-1])


def n_windows(embedding: torch.Tensor) -> int:
    """Windows in a (..., L, D) embedding."""
    return embedding.shape[-2] // WINDOW_LEN


def pad_windows(embedding: torch.Tensor, windows: int, empty: torch.Tensor) -> torch.Tensor:
    """(L, D) or (B, L, D) embedding padded to `windows` windows with copies of `empty` (77, D), the
    empty prompt's embedding; an embedding already that long is returned as it is."""
    missing = windows - n_windows(embedding)
    if missing < 0:
        raise ValueError(f"embedding has {n_windows(embedding)} windows, more than the {windows} asked for")
    if missing == 0:
        return embedding
    fill = empty.to(embedding.dtype).repeat(missing, 1)
    if embedding.ndim == 3:
        fill = fill.expand(embedding.shape[0], -1, -1)
    return torch.cat([embedding, fill], dim=-2)


def pad_pair(cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional and unconditional embeddings padded to the longer of the two (one UNet call)."""
    w = max(n_windows(cond), n_windows(uncond))
    return pad_windows(cond, w, empty), pad_windows(uncond, w, empty)


def key_mask(windows: Sequence[int] | torch.Tensor, total: int,
             device: torch.device | str = "cpu") -> torch.Tensor | None:
    """(B, total*77) bool mask, True on the keys of each row's own `windows`; None when no row is padded.

    Passed as the UNet's `encoder_attention_mask`, padding gets no attention, so a caption in a batch of
    longer ones conditions the UNet as it would alone (training batches mix caption lengths). Built on
    the CPU from host values and copied once, so it never waits for the device."""
    own = torch.as_tensor(windows, device="cpu")
    if bool((own == total).all()):
        return None
    keys = torch.arange(total * WINDOW_LEN)
    return (keys[None, :] < (own[:, None] * WINDOW_LEN)).to(device, non_blocking=True)


def pad_batch(embeddings: Sequence[torch.Tensor], empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embeddings of different lengths -> (B, Wmax*77, D) padded with the empty prompt, and `key_mask`."""
    windows = [n_windows(e) for e in embeddings]
    w = max(windows)
    return (torch.stack([pad_windows(e, w, empty) for e in embeddings]),
            key_mask(windows, w, embeddings[0].device))


def encode_padded(text_encoder: Any, ids: torch.Tensor,
                  windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, W, 77) ids whose rows fill `windows` (B,) of their W windows (both on the CPU) -> hidden states
    of the windows the longest row needs, and `key_mask` over them (the rest of each row is the empty
    prompt)."""
    w = int(windows.max())
    hidden = encode_windows(text_encoder, ids[:, :w])
    return hidden, key_mask(windows, w, hidden.device)


def tokenize_padded(tokenizer: Any, texts: Sequence[str],
                    max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, Wmax, 77) ids with the empty prompt's window as padding, and each text's window count (N,)."""
    rows = [window_ids(tokenizer, t, max_windows) for t in texts]
    w = max(len(r) for r in rows)
    empty = window_ids(tokenizer, "")
    padded = torch.stack([torch.cat([r, empty.expand(w - len(r), -1)]) for r in rows])
    return padded, torch.tensor([len(r) for r in rows])


def pipeline_embeds(pipe: Any, prompt: str, negative_prompt: str = "",
                    max_windows: int = DEFAULT_MAX_WINDOWS) -> dict[str, torch.Tensor]:
    """`prompt_embeds` / `negative_prompt_embeds` for a stock diffusers StableDiffusionPipeline call, so a
    plain-diffusers user (and our validation grids) condition on the whole report:
    `pipe(**pipeline_embeds(pipe, report), ...)`. The stock pipeline takes no text mask, so a negative
    prompt with more windows than the prompt dilutes the prompt there (our sampler masks it)."""
    device = getattr(pipe, "_execution_device", None)
    with torch.no_grad():
        empty = encode_windows(pipe.text_encoder, window_ids(pipe.tokenizer, ""), device)
        cond, uncond = (encode_windows(pipe.text_encoder, window_ids(pipe.tokenizer, t, max_windows), device)
                        for t in (prompt, negative_prompt))
        cond, uncond = pad_pair(cond, uncond, empty)
    return {"prompt_embeds": cond[None], "negative_prompt_embeds": uncond[None]}

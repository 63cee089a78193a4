"""CLIP token counts and the window sizes of long-prompt encoding, without torch.

Report handling (`cxrcommon.reports`) needs only these counts; keeping them apart from the torch code of
`prompt_windows` lets data preparation (finetune.prepare) read reports without loading torch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

WINDOW = 75                 # content tokens per window
WINDOW_LEN = WINDOW + 2     # with BOS and EOS: CLIP's 77 positions
DEFAULT_MAX_WINDOWS = 3     # 225 tokens: findings + impression of nearly every MIMIC report


@dataclass(frozen=True)
class TokenCount:
    """How long a prompt is in CLIP tokens and how many windows it needs."""
    tokens: int   # content tokens (no BOS/EOS)
    windows: int  # >= 1 (the empty prompt is one window)


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> list[TokenCount]:
    """Token and window counts, e.g. for logs and the app's live counter."""
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [TokenCount(len(i), max(1, math.ceil(len(i) / WINDOW))) for i in ids]

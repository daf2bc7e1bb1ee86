"""transformers as the reference implementation: load it, run it, measure agreement.

Imports torch, so only tools, demos and tests import this module, never the core.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np


def load_transformers_model(source: str | pathlib.Path, gguf_file: str | None = None) -> Any:
    """float32 eager-attention model from an HF directory, or a GGUF (directory + file name)."""
    import torch
    import transformers

    kwargs: dict[str, Any] = dict(dtype=torch.float32, attn_implementation="eager")
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    return transformers.AutoModelForCausalLM.from_pretrained(str(source), **kwargs).eval()


def load_transformers_gguf(path: str | pathlib.Path) -> Any:
    path = pathlib.Path(path)
    return load_transformers_model(path.parent, gguf_file=path.name)


def transformers_logits(model: Any, tokens_BxT: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.as_tensor(np.asarray(tokens_BxT), dtype=torch.long)).logits.float().numpy()


def transformers_greedy(model: Any, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([list(prompt)]), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def logit_agreement(ours_BxTxV: np.ndarray, theirs_BxTxV: np.ndarray) -> dict[str, float]:
    """Max/mean |difference|, mean KL(theirs || ours) per token, and top-1 agreement."""
    ours = np.asarray(ours_BxTxV, np.float64)
    theirs = np.asarray(theirs_BxTxV, np.float64)
    diff = np.abs(ours - theirs)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp_ours, lp_theirs = log_softmax(ours), log_softmax(theirs)
    kl = (np.exp(lp_theirs) * (lp_theirs - lp_ours)).sum(-1)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "mean_kl": float(kl.mean()),
        "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
    }

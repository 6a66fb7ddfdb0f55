"""Model FLOPs per token for MFU: the PaLM estimate (Chowdhery et al. 2022, appendix B), as nanoGPT uses.

    flops per token = 6·N + 12·L·d·T

N counts the parameters a token's forward pass multiplies by: every weight of `GPT` except the position
table (a lookup, no matmul); the tied token embedding is counted once, as the output head's matmul.
Each multiply-add is 2 FLOPs forward and 4 backward, hence 6·N. The attention term is the QKᵀ and
attention-times-V matmuls over the full T×T window of L layers of width d (causal masking is not
subtracted, as in PaLM). Recomputation by remat is not model FLOPs: this is MFU, not hardware FLOPs
utilization. N is read off the built module (tied weights once), so it is the planner's
`GPTSpec.n_params` less the position table without restating its shape arithmetic.

A model of your own reports its own figure through a method `flops_per_token(seq_len) -> float`;
without it bigbatch reports tokens/s but no MFU.
"""

from __future__ import annotations

from torch import nn


def transformer_flops_per_token(matmul_params: int, n_layer: int, d_model: int, seq_len: int) -> int:
    """6·N + 12·L·d·T (module doc)."""
    return 6 * matmul_params + 12 * n_layer * d_model * seq_len


def gpt_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """The estimate for `bigbatch.models.gpt.GPT`, its sizes read off the module."""
    params = sum(p.numel() for p in model.parameters())  # a tied tensor is yielded once
    return transformer_flops_per_token(params - model.pos.weight.numel(), len(model.blocks),
                                       model.tok.embedding_dim, seq_len)


def model_flops_per_token(model: nn.Module, seq_len: int) -> float | None:
    """FLOPs per trained token of `model` on windows of `seq_len`, or None when unknown."""
    from bigbatch.models.gpt import GPT

    if isinstance(model, GPT):
        return float(gpt_flops_per_token(model, seq_len))
    own = getattr(model, "flops_per_token", None)
    return float(own(seq_len)) if callable(own) else None

"""The drainage loss as a user writes it today: boolean masks, masked_select and a stacked
log-sum-exp over a materialised log-softmax (the style of the authors' reference code; our own
version). The baseline the fused kernel must beat, and a check that it computes the same thing."""

import math

import torch
import torch.nn.functional as F


def naive_drainage_loss(logits, target, alpha=1.0, beta=None, drainage_idx=-1, reduction="mean"):
    """(N, K) logits, (N,) targets; no ignore_index (as in the authors' code)."""
    beta = 1.0 / alpha if beta is None else beta
    K = logits.shape[1]
    d = drainage_idx % K
    log_p = F.log_softmax(logits.float(), dim=1)
    is_t = F.one_hot(target.long(), K).bool()
    is_d = torch.zeros_like(is_t)
    is_d[:, d] = True
    log_p_t = log_p.masked_select(is_t)
    log_p_d = log_p[:, d]
    log_p_J = log_p.masked_fill(is_t | is_d, float("-inf")).logsumexp(dim=1)
    terms = torch.stack(
        [
            torch.zeros_like(log_p_t),
            math.log(alpha) + torch.logaddexp(log_p_d, log_p_J) - log_p_t,
            math.log(beta) + log_p_J - log_p_d,
        ],
        dim=1,
    )
    loss = terms.logsumexp(dim=1)
    return loss if reduction == "none" else loss.sum() if reduction == "sum" else loss.mean()

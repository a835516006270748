"""The robust-loss zoo: every loss is an nn.Module called as loss(logits, target) -> mean over the batch.

Notation: logits z (N, K), p = softmax(z), t the (noisy) target, C the number of classes. Every loss
but Drainage has K = C outputs; Drainage has K = C + 1 (the drainage node is the last output).
Losses compute in float32 whatever the autocast dtype (Drainage: the fused kernel does its own fp32 math).

    CE        -log p_t
    FL        -(1 - p_t)^gamma log p_t                                   (Lin et al. 2017)
    MAE       1 - p_t   (= sum_k |p_k - y_k| / 2, the scaling of the APL / ANL implementations)
    GCE       (1 - p_t^q) / q,  p >= 1e-7                                (Zhang & Sabuncu 2018)
    RCE       -sum_k p_k log y~_k,  y~ = one-hot clamped to [1e-4, 1], p to [1e-7, 1]
              = -log(1e-4) * sum_{k != t} p_k                            (Wang et al. 2019)
    SCE       alpha CE + beta RCE
    NCE       (-log p_t) / sum_k (-log p_k)                              (Ma et al. 2020, APL)
    NFL       FL_t / sum_k FL_k,  FL_k = -(1 - p_k)^gamma log p_k
    AGCE      ((a + 1)^q - (a + p_t)^q) / q                               (Zhou et al. 2021, ALFs)
    AUL       ((a - p_t)^q - (a - 1)^q) / q
    AEL       exp(-p_t / a)
    NNCE      1 - (A + log p_t) / sum_k (A + log p_k),  A = -log(min_prob), p >= min_prob
    NNFL      1 - (A - FL_t) / (C A - sum_k FL_k),  A = -(1 - min_prob)^gamma log(min_prob),
              log p >= log(min_prob)                                     (Ye et al. 2023, ANL)
    APL       alpha * active + beta * passive       (nce_mae, nce_rce, nfl_mae, nfl_rce, nce_agce, ...)
    ANL       alpha * active + beta * normalised negative       (anl_ce = NCE + NNCE, anl_fl = NFL + NNFL)
    ANL-CE-ER anl_ce + lamb * (log C + sum_c pbar_c log pbar_c), pbar = batch-mean class distribution
    Drainage  log(1 + alpha (p_d + p_J) / p_t + beta p_J / p_d)   via drainage_fast.fused_drainage_loss

The focal family (FL, NFL, NNFL and the combinations nfl_mae, nfl_rce, anl_fl) takes
detach_focal_weight (default true). True replicates the official code: every focal weight (1 - p_k)^gamma
is a constant in the backward pass (`torch.autograd.Variable(logpt.data.exp())` and
`(1 - logpt.data.exp()) ** gamma` in FocalLoss, NormalizedFocalLoss and NormalizedNegativeFocalLoss of
https://github.com/ZKI-PH-ImageAnalysis/Drainage/blob/3359c4bbcd4ef5869ddd95dff2cd78fb7af89467/loss.py
lines 153, 176-179 and 198-201; the same code as HanxunH/Active-Passive-Losses and
Virusdoll/Active-Negative-Loss loss.py), so
d FL_k / d z = -(1 - p_k)^gamma d log p_k / d z. False differentiates the weight too (the gradient of the
formula as written: d FL_k / d z = -[(1 - p_k)^gamma - gamma (1 - p_k)^(gamma - 1) p_k log p_k]
d log p_k / d z). Values are the same; gradients differ (up to ~11% in norm at C = 10).
Float64 logits are computed in float64 (for float64 checks); every other dtype in float32.

The L1 parameter penalty delta * sum|theta| of ANL and the Drainage paper is not part of any loss here:
the trainer adds it for every loss when delta > 0 (l1_penalty).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from drainage_fast import fused_drainage_loss

from .run_dirs import UserError

RCE_LOG_FLOOR = -math.log(1e-4)  # -log of the clamped zero entries of the one-hot target
PROB_FLOOR = 1e-7  # the clamp every implementation applies before log / pow
DETACH = "detach_focal_weight"  # the focal family's switch (module docstring)


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """float64 stays float64; every other dtype computes in float32."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return _upcast(logits).softmax(dim=1)


def _target_prob(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return p.gather(1, target[:, None])[:, 0]


class CrossEntropy(nn.Module):
    def forward(self, logits, target):
        return F.cross_entropy(logits.float(), target)


class FocalLoss(nn.Module):
    """FL; detach_focal_weight: see the module docstring (true: the official gradient)."""

    def __init__(self, gamma: float = 0.5, detach_focal_weight: bool = True):
        super().__init__()
        self.gamma, self.detach_focal_weight = gamma, detach_focal_weight

    def forward(self, logits, target):
        logp_t = _target_prob(F.log_softmax(_upcast(logits), dim=1), target)
        return _focal_terms(logp_t, self.gamma, self.detach_focal_weight).mean()


class MeanAbsoluteError(nn.Module):
    def forward(self, logits, target):
        return (1 - _target_prob(_probs(logits), target)).mean()


class GeneralizedCrossEntropy(nn.Module):
    def __init__(self, q: float = 0.7):
        super().__init__()
        self.q = q

    def forward(self, logits, target):
        p_t = _target_prob(_probs(logits).clamp(min=PROB_FLOOR), target)
        return ((1 - p_t**self.q) / self.q).mean()


class ReverseCrossEntropy(nn.Module):
    def forward(self, logits, target):
        p = _probs(logits).clamp(min=PROB_FLOOR, max=1.0)
        off_target = p.sum(1) - _target_prob(p, target)
        return (RCE_LOG_FLOOR * off_target).mean()


class NormalizedCrossEntropy(nn.Module):
    def forward(self, logits, target):
        logp = F.log_softmax(logits.float(), dim=1)
        return (_target_prob(logp, target) / logp.sum(1)).mean()


def _focal_terms(logp: torch.Tensor, gamma: float, detach_weight: bool) -> torch.Tensor:
    """FL_k = -(1 - p_k)^gamma log p_k elementwise; detach_weight: (1 - p_k)^gamma is a constant for
    autograd, as in the official code (`logpt.data.exp()`, Drainage loss.py lines 153, 176, 198)."""
    weight = (1 - logp.exp()) ** gamma
    return -(weight.detach() if detach_weight else weight) * logp


class NormalizedFocalLoss(nn.Module):
    """NFL; detach_focal_weight: see the module docstring (true: the official gradient)."""

    def __init__(self, gamma: float = 0.5, detach_focal_weight: bool = True):
        super().__init__()
        self.gamma, self.detach_focal_weight = gamma, detach_focal_weight

    def forward(self, logits, target):
        fl = _focal_terms(F.log_softmax(_upcast(logits), dim=1), self.gamma, self.detach_focal_weight)
        return (_target_prob(fl, target) / fl.sum(1)).mean()


class AsymmetricGCE(nn.Module):
    def __init__(self, a: float = 1.0, q: float = 2.0):
        super().__init__()
        self.a, self.q = a, q

    def forward(self, logits, target):
        p_t = _target_prob(_probs(logits), target)
        return (((self.a + 1) ** self.q - (self.a + p_t) ** self.q) / self.q).mean()


class AsymmetricUnhingedLoss(nn.Module):
    def __init__(self, a: float = 1.5, q: float = 0.9):
        super().__init__()
        self.a, self.q = a, q

    def forward(self, logits, target):
        p_t = _target_prob(_probs(logits), target)
        return (((self.a - p_t) ** self.q - (self.a - 1) ** self.q) / self.q).mean()


class AsymmetricExponentialLoss(nn.Module):
    def __init__(self, a: float = 3.0):
        super().__init__()
        self.a = a

    def forward(self, logits, target):
        return torch.exp(-_target_prob(_probs(logits), target) / self.a).mean()


class NormalizedNegativeCrossEntropy(nn.Module):
    def __init__(self, min_prob: float = PROB_FLOOR):
        super().__init__()
        self.min_prob, self.A = min_prob, -math.log(min_prob)

    def forward(self, logits, target):
        shifted = self.A + _probs(logits).clamp(min=self.min_prob, max=1.0).log()  # >= 0
        return (1 - _target_prob(shifted, target) / shifted.sum(1)).mean()


class NormalizedNegativeFocalLoss(nn.Module):
    """NNFL; detach_focal_weight: see the module docstring (true: the official gradient)."""

    def __init__(
        self,
        num_classes: int,
        gamma: float = 0.5,
        min_prob: float = PROB_FLOOR,
        detach_focal_weight: bool = True,
    ):
        super().__init__()
        self.num_classes, self.gamma, self.log_min = num_classes, gamma, math.log(min_prob)
        self.A = -((1 - min_prob) ** gamma) * self.log_min  # FL at p = min_prob: the largest FL_k
        self.detach_focal_weight = detach_focal_weight

    def forward(self, logits, target):
        logp = F.log_softmax(_upcast(logits), dim=1).clamp(min=self.log_min)
        fl = _focal_terms(logp, self.gamma, self.detach_focal_weight)
        nnfl = 1 - (self.A - _target_prob(fl, target)) / (self.num_classes * self.A - fl.sum(1))
        return nnfl.mean()


class Weighted(nn.Module):
    """alpha * first + beta * second: the APL and ANL combinations."""

    def __init__(self, first: nn.Module, second: nn.Module, alpha: float = 1.0, beta: float = 1.0):
        super().__init__()
        self.first, self.second, self.alpha, self.beta = first, second, alpha, beta

    def forward(self, logits, target):
        return self.alpha * self.first(logits, target) + self.beta * self.second(logits, target)


class EntropyRegularised(nn.Module):
    """loss + lamb * (log C - H(pbar)): pushes the batch-mean prediction towards uniform (ANL-CE-ER)."""

    def __init__(self, base: nn.Module, num_classes: int, lamb: float = 1.0, min_prob: float = PROB_FLOOR):
        super().__init__()
        self.base, self.num_classes, self.lamb, self.min_prob = base, num_classes, lamb, min_prob

    def forward(self, logits, target):
        p = _probs(logits).clamp(min=self.min_prob, max=1 - self.min_prob)
        pbar = (p.sum(0) / p.sum()).clamp(min=self.min_prob, max=1 - self.min_prob)
        neg_entropy_gap = math.log(self.num_classes) + (pbar * pbar.log()).sum()
        return self.base(logits, target) + self.lamb * neg_entropy_gap


class Drainage(nn.Module):
    """Drainage loss over K = C + 1 outputs, drainage node last; beta defaults to 1 / alpha."""

    def __init__(self, alpha: float = 1.0, beta: float | None = None, backend: str = "auto"):
        super().__init__()
        self.alpha, self.beta, self.backend = alpha, beta, backend

    def forward(self, logits, target):
        return fused_drainage_loss(
            logits, target, alpha=self.alpha, beta=self.beta, drainage_idx=-1, backend=self.backend
        )


def _apl(active, passive):
    return lambda C, alpha=1.0, beta=1.0, **kw: Weighted(active(C, **kw), passive(C, **kw), alpha, beta)


def _pick(params: dict, *names: str) -> dict:
    """The subset of a combination's parameters that one of its parts takes."""
    return {k: v for k, v in params.items() if k in names}


def _nce(C, **kw):
    return NormalizedCrossEntropy()


def _nfl(C, **kw):
    return NormalizedFocalLoss(**_pick(kw, "gamma", DETACH))


def _mae(C, **kw):
    return MeanAbsoluteError()


def _rce(C, **kw):
    return ReverseCrossEntropy()


def _agce(C, **kw):
    return AsymmetricGCE(**_pick(kw, "a", "q"))


def _aul(C, **kw):
    return AsymmetricUnhingedLoss(**_pick(kw, "a", "q"))


def _ael(C, **kw):
    return AsymmetricExponentialLoss(**_pick(kw, "a"))


def _nnce(C, **kw):
    return NormalizedNegativeCrossEntropy(**_pick(kw, "min_prob"))


def _nnfl(C, **kw):
    return NormalizedNegativeFocalLoss(C, **_pick(kw, "gamma", "min_prob", DETACH))


def _anl_ce_er(C, alpha=1.0, beta=1.0, lamb=1.0, min_prob=PROB_FLOOR):
    anl = Weighted(NormalizedCrossEntropy(), NormalizedNegativeCrossEntropy(min_prob), alpha, beta)
    return EntropyRegularised(anl, C, lamb, min_prob)


# name -> (builder(C, **params), the parameters it accepts). Builders reject unknown parameters so a
# typo in a config fails loudly instead of silently training with a default.
LOSSES = {
    "ce": (lambda C: CrossEntropy(), ()),
    "fl": (
        lambda C, gamma=0.5, detach_focal_weight=True: FocalLoss(gamma, detach_focal_weight),
        ("gamma", DETACH),
    ),
    "mae": (_mae, ()),
    "gce": (lambda C, q=0.7: GeneralizedCrossEntropy(q), ("q",)),
    "sce": (
        lambda C, alpha=0.1, beta=1.0: Weighted(CrossEntropy(), ReverseCrossEntropy(), alpha, beta),
        ("alpha", "beta"),
    ),
    "rce": (_rce, ()),
    "nce": (_nce, ()),
    "nfl": (_nfl, ("gamma", DETACH)),
    "agce": (_agce, ("a", "q")),
    "aul": (_aul, ("a", "q")),
    "ael": (_ael, ("a",)),
    "nnce": (_nnce, ("min_prob",)),
    "nnfl": (_nnfl, ("gamma", "min_prob", DETACH)),
    "nce_mae": (_apl(_nce, _mae), ("alpha", "beta")),
    "nce_rce": (_apl(_nce, _rce), ("alpha", "beta")),
    "nfl_mae": (_apl(_nfl, _mae), ("alpha", "beta", "gamma", DETACH)),
    "nfl_rce": (_apl(_nfl, _rce), ("alpha", "beta", "gamma", DETACH)),
    "nce_agce": (_apl(_nce, _agce), ("alpha", "beta", "a", "q")),
    "nce_aul": (_apl(_nce, _aul), ("alpha", "beta", "a", "q")),
    "nce_ael": (_apl(_nce, _ael), ("alpha", "beta", "a")),
    "anl_ce": (_apl(_nce, _nnce), ("alpha", "beta", "min_prob")),
    "anl_fl": (_apl(_nfl, _nnfl), ("alpha", "beta", "gamma", "min_prob", DETACH)),
    "anl_ce_er": (_anl_ce_er, ("alpha", "beta", "lamb", "min_prob")),
    "drainage": (
        lambda C, alpha=1.0, beta=None, backend="auto": Drainage(alpha, beta, backend),
        ("alpha", "beta", "backend"),
    ),
}
ALIASES = {"alpha_dl": "drainage"}  # the Drainage authors' name for it
# what the help of --losses and the error for an unknown loss both say
LOSS_NAMES = (
    f"{', '.join(LOSSES)}; the papers' spellings work too, in any case, with + or - for _ "
    "(NCE+MAE = nce_mae, ANL-CE = anl_ce)"
)


def name_key(name: str) -> str:
    """How loss (and open-set method) names compare: case, "+", "-" and "_" alike, so that the papers'
    NCE+MAE and ANL-CE name the code's nce_mae and anl_ce."""
    return re.sub(r"[+\-]", "_", str(name).strip().lower())


def canonical_loss_name(name: str, given_as: str = "loss=") -> str:
    """The LOSSES key of a loss name in any spelling (name_key); a UserError naming it, as `given_as`
    wrote it (loss=, --losses ), for an unknown one."""
    key = ALIASES.get(name_key(name), name_key(name))
    if key not in LOSSES:
        raise UserError(f"{given_as}{name}: unknown loss; choose from {LOSS_NAMES}")
    return key


def build_loss(name: str, num_classes: int, **params) -> nn.Module:
    """The loss `name` for `num_classes` classes, called as loss(logits (N, K), target (N,)) -> scalar.

    Raises UserError (a ValueError) for an unknown name, a parameter the loss does not take, or a
    parameter value that is not a number (backend: a word; beta: also null; detach_focal_weight: a bool).
    """
    name = canonical_loss_name(name)
    builder, accepted = LOSSES[name]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise UserError(f"loss {name!r} takes parameters {list(accepted)}, got unknown {unknown}")
    for key, value in params.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key == "backend":
            ok, kind = isinstance(value, str), "a backend name"
        elif key == DETACH:
            ok, kind = isinstance(value, bool), "true or false"
        else:
            ok, kind = number or (key == "beta" and value is None), "a number"
        if not ok:
            raise UserError(f"loss_params.{key}={value!r}: {name} takes {kind} for {key}")
    return builder(num_classes, **params)


def num_outputs(loss_name: str, num_classes: int) -> int:
    """K: C + 1 for Drainage (the drainage node), C for every other loss."""
    return num_classes + 1 if canonical_loss_name(loss_name) == "drainage" else num_classes


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """sum |theta| over every parameter (fp32); the trainer adds delta times this when delta > 0."""
    return torch.stack([p.float().abs().sum() for p in model.parameters()]).sum()

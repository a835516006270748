"""The robust-loss zoo: every loss is an nn.Module called as loss(logits, target) -> mean over the batch.

Notation: logits z (N, K), p = softmax(z), t the (noisy) target, C the number of classes. Every loss
but the abstaining ones has K = C outputs; Drainage, Deep Gamblers and DAC have K = C + 1 (the drainage,
or abstain, output d is the last one). Losses compute in float32 whatever the autocast dtype (the
abstaining ones: drainage_fast's fused kernels do their own fp32 math).

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
    Gamblers  -log(p_t + p_d / reward), after `pretrain` epochs of CE over the C classes
              (Liu et al. 2019)                                          via fused_gamblers_loss
    DAC       (1 - p_d) CE_C - alpha log(1 - p_d), after `learn_epochs` of CE over all K outputs; alpha
              ramps once per epoch (Thulasidasan et al. 2019)           via fused_dac_loss

The abstaining losses (Abstaining) follow their authors' training schedules: the trainer calls
start_epoch(epoch, epochs) before every epoch and keeps schedule_state() in its checkpoint, so that a
resumed run continues the schedule bit for bit. Their classes document the official code they follow.

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

from drainage_fast import DACLoss, FusedCrossEntropyLoss, GamblersLoss, fused_drainage_loss

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


class Abstaining(nn.Module):
    """A loss of the abstention family: K = C + 1 outputs, the abstain (drainage) output d last, computed
    by drainage_fast's fused kernels. Its form may change with the epoch (a warm-up, a schedule): the
    trainer calls start_epoch before each epoch and keeps schedule_state() in the checkpoint; phase() is
    what an epoch's metrics row records of it. Drainage has no schedule."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.epoch, self.epochs = 1, 1  # the epoch being trained (1-based) and the planned number

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.epoch, self.epochs = epoch, epochs

    def schedule_state(self) -> dict:
        """What a checkpoint keeps of the schedule (tensors, numbers and None: weights_only loads it)."""
        return {}

    def load_schedule_state(self, state: dict) -> None:
        """Continues the schedule from schedule_state()'s dict."""

    def phase(self) -> dict:
        return {}

    def warm_up(self) -> tuple[str, int] | None:
        """(the loss parameter, its number of epochs) of a warm-up before the loss itself; None: none."""
        return None


class Drainage(Abstaining):
    """Drainage loss over K = C + 1 outputs, drainage node last; beta defaults to 1 / alpha."""

    def __init__(self, alpha: float = 1.0, beta: float | None = None, backend: str = "auto"):
        super().__init__(backend)
        self.alpha, self.beta = alpha, beta

    def forward(self, logits, target):
        return fused_drainage_loss(
            logits, target, alpha=self.alpha, beta=self.beta, drainage_idx=-1, backend=self.backend
        )


def _library_checked(loss: str, build):
    """build() (a drainage_fast module, which checks its hyper-parameters); its ValueError as a
    UserError naming the loss."""
    try:
        return build()
    except ValueError as exc:
        raise UserError(f"loss_params of {loss}: {exc}") from None


class DeepGamblers(Abstaining):
    """Deep Gamblers (Liu et al., NeurIPS 2019) trained as its authors train it: the first `pretrain`
    epochs minimise the cross-entropy over the C class outputs, then -log(p_t + p_d / reward).

    Z-T-WANG/NIPS2019DeepGamblers, main.py at 0d1b595611a8bc653fddfdf1419bd8dbde153532, train():
    `if epoch >= args.pretrain:` (0-based epochs) the gambler's loss `-(gain + reservation / reward)
    .log().mean()` over the softmax of all outputs, else `criterion(outputs[:,:-1], targets)`
    (nn.CrossEntropyLoss over the class outputs). Its defaults: reward 2.2 (`--rewards`), pretrain 0,
    except 100 (of 300 epochs) for CIFAR-10 with a reward below 6.1. Here: epochs 1..pretrain
    (1-based) pre-train through fused_cross_entropy_loss(over="classes"), the rest through
    fused_gamblers_loss."""

    def __init__(self, reward: float = 2.2, pretrain: int = 0, backend: str = "auto"):
        super().__init__(backend)
        self.pretrain = pretrain
        self.gamblers = _library_checked("gamblers", lambda: GamblersLoss(reward, backend=backend))
        self.ce_classes = FusedCrossEntropyLoss("classes", backend=backend)

    @property
    def pretraining(self) -> bool:
        return self.epoch <= self.pretrain

    def forward(self, logits, target):
        return (self.ce_classes if self.pretraining else self.gamblers)(logits, target)

    def phase(self) -> dict:
        return {"loss_phase": "pretrain" if self.pretraining else "gamblers"}

    def warm_up(self) -> tuple[str, int]:
        return "pretrain", self.pretrain


class DeepAbstainingClassifier(Abstaining):
    """DAC (Thulasidasan et al., ICML 2019) trained as its authors train it: `learn_epochs` of
    cross-entropy over all K outputs, then (1 - p_d) CE_C - alpha log(1 - p_d) with alpha ramped.

    thulas/dac-label-noise at 03f9ec6748bd1c029957f803df6adb08458563bc, dac_loss.py (class dac_loss,
    called on every training batch with train_dac.py's 1-based epoch):
    - while `epoch <= self.learn_epochs`: F.cross_entropy over all outputs, and an EWMA (ewma_mu = 0.05)
      tracks mean((1 - p_d) * h_c), h_c the cross-entropy over the C class outputs;
    - on the first batch after the warm-up the EWMA takes that batch too, then alpha = EWMA /
      alpha_init_factor (64) and alpha_inc = (alpha_final - alpha) / (total_epochs - epoch);
    - alpha grows by alpha_inc on the first batch of every later epoch, reaching alpha_final (1.0) in
      the last epoch.
    Here alpha in epoch e is written in closed form, alpha_0 + (alpha_final - alpha_0) (e - e_0) /
    (epochs - e_0) (e_0 the epoch alpha_0 was set in; alpha_0 when e_0 is the last epoch, where the
    official code divides by zero): the same ramp without a running sum, and a resume that extends a run
    (`--set epochs=N`) re-plans it to reach alpha_final at the new last epoch, as the cosine learning
    rate is re-planned. Unlike the official code, p_d is not clamped at 1 - 1e-7 (fused_dac_loss is
    exact in log space). The EWMA is a device tensor (no host synchronisation per batch) kept in the
    checkpoint with alpha_0 and e_0. `reduce_mean`, when set (train/scale/loop.py under DDP), turns a
    batch mean into the mean over every rank's batch, so that all ranks share one alpha.
    """

    EWMA_MU = 0.05  # dac_loss.py: self.ewma_mu, not a flag of train_dac.py

    def __init__(
        self,
        learn_epochs: int = 10,
        alpha_final: float = 1.0,
        alpha_init_factor: float = 64.0,
        backend: str = "auto",
    ):
        super().__init__(backend)
        self.learn_epochs = learn_epochs
        self.alpha_final = _library_checked("dac", lambda: DACLoss(alpha_final).alpha)
        if isinstance(alpha_init_factor, bool) or not alpha_init_factor > 0:
            raise UserError(f"loss_params.alpha_init_factor={alpha_init_factor!r}: dac takes a number > 0")
        self.alpha_init_factor = alpha_init_factor
        self.dac = DACLoss(self.alpha_final, backend=backend)
        self.ce_all = FusedCrossEntropyLoss("all", backend=backend)
        self.ewma: torch.Tensor | None = None
        self.alpha_0: float | None = None
        self.alpha_epoch: int | None = None
        self.reduce_mean = None

    @property
    def warming_up(self) -> bool:
        return self.epoch <= self.learn_epochs

    @property
    def alpha(self) -> float | None:
        """alpha in the current epoch (None during the warm-up)."""
        if self.alpha_0 is None:
            return None
        span = self.epochs - self.alpha_epoch
        done = (self.epoch - self.alpha_epoch) / span if span > 0 else 0.0
        if done >= 1:  # the last epoch: alpha_final itself, not alpha_0 + (alpha_final - alpha_0) rounded
            return self.alpha_final
        return self.alpha_0 + (self.alpha_final - self.alpha_0) * done

    @torch.no_grad()
    def _observe(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """EWMA <- mu * mean((1 - p_d) CE_C) + (1 - mu) * EWMA (the first batch: its mean)."""
        z = logits.detach().float()
        kept = z.log_softmax(dim=1)[:, -1].exp().neg().add(1.0)  # 1 - p_d
        ce_classes = F.cross_entropy(z[:, :-1], target, reduction="none")
        value = (kept * ce_classes).mean()
        if self.reduce_mean is not None:
            value = self.reduce_mean(value)
        self.ewma = value if self.ewma is None else self.EWMA_MU * value + (1 - self.EWMA_MU) * self.ewma

    def forward(self, logits, target):
        if self.warming_up:
            self._observe(logits, target)
            return self.ce_all(logits, target)
        if self.alpha_0 is None:  # the first batch after the warm-up
            self._observe(logits, target)
            self.alpha_0, self.alpha_epoch = self.ewma.item() / self.alpha_init_factor, self.epoch
        self.dac.alpha = self.alpha
        return self.dac(logits, target)

    def schedule_state(self) -> dict:
        return {"ewma": self.ewma, "alpha_0": self.alpha_0, "alpha_epoch": self.alpha_epoch}

    def load_schedule_state(self, state: dict) -> None:
        self.ewma, self.alpha_0, self.alpha_epoch = state["ewma"], state["alpha_0"], state["alpha_epoch"]

    def phase(self) -> dict:
        if self.warming_up:
            return {"loss_phase": "warm-up"}
        return {"loss_phase": "abstain", "dac_alpha": self.alpha}

    def warm_up(self) -> tuple[str, int]:
        return "learn_epochs", self.learn_epochs


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
    "gamblers": (
        lambda C, reward=2.2, pretrain=0, backend="auto": DeepGamblers(reward, pretrain, backend),
        ("reward", "pretrain", "backend"),
    ),
    "dac": (
        lambda C, learn_epochs=10, alpha_final=1.0, alpha_init_factor=64.0, backend="auto": (
            DeepAbstainingClassifier(learn_epochs, alpha_final, alpha_init_factor, backend)
        ),
        ("learn_epochs", "alpha_final", "alpha_init_factor", "backend"),
    ),
}
ABSTAINING = ("drainage", "gamblers", "dac")  # K = C + 1 outputs, the abstain output last
EPOCH_COUNTS = ("pretrain", "learn_epochs")  # loss parameters that count epochs of a schedule
ALIASES = {  # the authors' names: Drainage's alpha_dl, the titles of the DAC and Deep Gamblers papers
    "alpha_dl": "drainage",
    "dac_loss": "dac",
    "deep_gamblers": "gamblers",
}
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
        elif key in EPOCH_COUNTS:
            ok, kind = number and isinstance(value, int) and value >= 0, "an integer >= 0 (epochs)"
        else:
            ok, kind = number or (key == "beta" and value is None), "a number"
        if not ok:
            raise UserError(f"loss_params.{key}={value!r}: {name} takes {kind} for {key}")
    return builder(num_classes, **params)


def phase_text(row: dict) -> str | None:
    """An epoch row's loss phase (Abstaining.phase) as log text: "warm-up", "abstain alpha 0.25", ...;
    None for a loss without one."""
    if "loss_phase" not in row:
        return None
    return row["loss_phase"] + (f" alpha {row['dac_alpha']:.4g}" if "dac_alpha" in row else "")


def is_abstaining(loss_name: str) -> bool:
    """Whether the loss has the abstain (drainage) output: Drainage, Deep Gamblers, DAC."""
    return canonical_loss_name(loss_name) in ABSTAINING


def num_outputs(loss_name: str, num_classes: int) -> int:
    """K: C + 1 for the abstaining losses (the abstain output), C for every other loss."""
    return num_classes + 1 if is_abstaining(loss_name) else num_classes


def check_schedule(loss: nn.Module, epochs: int) -> None:
    """A UserError when a schedule's warm-up (Deep Gamblers' pretrain, DAC's learn_epochs) leaves no
    epoch to the loss itself (loss: build_loss's module)."""
    warm_up = loss.warm_up() if isinstance(loss, Abstaining) else None
    if warm_up is not None and warm_up[1] >= epochs:
        key, value = warm_up
        raise UserError(
            f"loss_params.{key}={value}: must be < epochs={epochs} (the loss itself trains after the "
            f"{key} epochs)"
        )


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """sum |theta| over every parameter (fp32); the trainer adds delta times this when delta > 0."""
    return torch.stack([p.float().abs().sum() for p in model.parameters()]).sum()

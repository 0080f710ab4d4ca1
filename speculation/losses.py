"""Training losses of the learned routing predictors: one pure function per term, combined in ``combine``.

Shape legend (docs/glossary.md): B sequences, T tokens of the window, L source MoE layers, D lookaheads (index j is
lookahead d = j + 1), E experts of the target layer l + d.

Every term is a masked mean: sum over the bool mask / mask.sum().clamp_min(1), computed in float32 whatever the
input dtype. Masked-out entries are replaced by constants before any arithmetic, so padding (even NaN or inf) never
reaches the value or the gradient.

``total``: every sum over the batch (a mean's numerator and denominator, the diversity term's mean prediction) goes
through it. By default it is the identity: the batch is this process'. Data-parallel training passes
:func:`speculation.distributed.total`, which sums over every rank's share of a global batch, so each rank computes
the global batch's loss (the same value, and its gradient once averaged over ranks) from its own rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from speculation.config.predictor import LOSS_TERMS, ROUTING_MODES  # the names the config's weights use

Total = Callable[[Tensor], Tensor]  # a batch sum -> the same sum over the whole (global) batch


def local(tensor: Tensor) -> Tensor:
    """The default ``total``: the batch is this process' alone."""
    return tensor


def masked_mean(values: Tensor, mask: Tensor, weight: Tensor | None = None, total: Total = local) -> Tensor:
    """sum(values[mask]) / max(mask.sum(), 1) in float32; ``values`` and ``mask`` have the same shape.

    With ``weight`` (same shape): sum(w · values) / sum(w) over ``mask``. Both sums go through ``total``."""
    assert mask.dtype == torch.bool, f"mask must be bool, got {mask.dtype}"
    assert values.shape == mask.shape, f"values {tuple(values.shape)} vs mask {tuple(mask.shape)}"
    masked = torch.where(mask, values.float(), 0.0)
    if weight is None:
        return total(masked.sum()) / total(mask.sum()).clamp_min(1).float()
    weight = torch.where(mask, weight.float(), 0.0)
    return total((masked * weight).sum()) / total(weight.sum()).clamp_min(1e-12)


def _check_prediction(logits_BTLDE: Tensor, valid_BTLD: Tensor) -> None:
    assert valid_BTLD.dtype == torch.bool, f"valid mask must be bool, got {valid_BTLD.dtype}"
    assert logits_BTLDE.shape[:-1] == valid_BTLD.shape, (
        f"logits {tuple(logits_BTLDE.shape)} vs valid {tuple(valid_BTLD.shape)}"
    )


def _clean_log_probs(logits_BTLDE: Tensor, valid_BTLD: Tensor) -> Tensor:
    """log_softmax in float32, with invalid rows' logits replaced by zeros first (no NaN from padding)."""
    logits_BTLDE = torch.where(valid_BTLD[..., None], logits_BTLDE.float(), 0.0)
    return torch.log_softmax(logits_BTLDE, dim=-1)


def routing_loss(
    logits_BTLDE: Tensor,
    target_BTLD: Tensor,
    router_probs_BTLDE: Tensor,
    valid_BTLD: Tensor,
    mode: str = "ce",
    weight_BTLD: Tensor | None = None,
    total: Total = local,
) -> Tensor:
    """Distance of the predicted distribution q = softmax(logits) to the router's decision at layer l + d.

    ``weight_BTLD``: per-entry weights w; the loss is then sum(w · loss) / sum(w) over valid entries.

    mode "ce": cross-entropy to the router's top-1 choice, mean over valid of -log q[target].
    mode "kl": KL(r || q) = sum_e r_e (log r_e - log q_e), with 0 log 0 = 0, averaged over valid entries.
    ``target_BTLD`` (long, -1 where undefined) is used by "ce", ``router_probs_BTLDE`` (r) by "kl".
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"unknown routing loss mode {mode!r}; choose one of {ROUTING_MODES}")
    _check_prediction(logits_BTLDE, valid_BTLD)
    log_q_BTLDE = _clean_log_probs(logits_BTLDE, valid_BTLD)
    if mode == "ce":
        target_BTLD = torch.where(valid_BTLD, target_BTLD, 0)
        nll_BTLD = -log_q_BTLDE.gather(-1, target_BTLD[..., None]).squeeze(-1)
        return masked_mean(nll_BTLD, valid_BTLD, weight_BTLD, total)
    assert router_probs_BTLDE.shape == logits_BTLDE.shape, (
        f"router_probs {tuple(router_probs_BTLDE.shape)} vs logits {tuple(logits_BTLDE.shape)}"
    )
    r_BTLDE = torch.where(valid_BTLD[..., None], router_probs_BTLDE.float(), 0.0)
    kl_BTLD = (torch.xlogy(r_BTLDE, r_BTLDE) - r_BTLDE * log_q_BTLDE).sum(-1)
    return masked_mean(kl_BTLD, valid_BTLD, weight_BTLD, total)


def confidence_loss(
    logits_BTLDE: Tensor, confidence_BTLD: Tensor, target_BTLD: Tensor, valid_BTLD: Tensor, total: Total = local
) -> Tensor:
    """Binary cross-entropy of the confidence c in (0, 1) against top-1 correctness y = [argmax logits == target].

    mean over valid of -(y log c + (1 - y) log(1 - c)); y is a constant (no gradient into the logits through it);
    logs are clamped at -100 as in ``F.binary_cross_entropy``.
    """
    _check_prediction(logits_BTLDE, valid_BTLD)
    assert confidence_BTLD.shape == valid_BTLD.shape, (
        f"confidence {tuple(confidence_BTLD.shape)} vs valid {tuple(valid_BTLD.shape)}"
    )
    correct_BTLD = (logits_BTLDE.detach().argmax(-1) == target_BTLD) & valid_BTLD
    confidence_BTLD = torch.where(valid_BTLD, confidence_BTLD.float(), 0.5)
    bce_BTLD = F.binary_cross_entropy(confidence_BTLD, correct_BTLD.float(), reduction="none")
    return masked_mean(bce_BTLD, valid_BTLD, total=total)


def consistency_loss(logits_BTLDE: Tensor, pair_BT: Tensor, valid_BTLD: Tensor, total: Total = local) -> Tensor:
    """Temporal smoothness: sum_e (q_t,e - q_t-1,e)^2 at the same (l, d), averaged over adjacent-token pairs.

    q = softmax(logits). A pair counts where ``pair_BT`` marks t as having its predecessor t - 1 in the same
    sequence and both (t, l, d) and (t - 1, l, d) are valid; ``pair_BT[:, 0]`` is ignored (no predecessor).
    Gradient reaches both tokens of a pair.
    """
    _check_prediction(logits_BTLDE, valid_BTLD)
    assert pair_BT.dtype == torch.bool, f"pair mask must be bool, got {pair_BT.dtype}"
    assert pair_BT.shape == valid_BTLD.shape[:2], f"pair {tuple(pair_BT.shape)} vs valid {tuple(valid_BTLD.shape)}"
    q_BTLDE = _clean_log_probs(logits_BTLDE, valid_BTLD).exp()
    squared_BTLD = (q_BTLDE[:, 1:] - q_BTLDE[:, :-1]).square().sum(-1)  # T - 1 pairs (t - 1, t)
    pair_mask_BTLD = pair_BT[:, 1:, None, None] & valid_BTLD[:, 1:] & valid_BTLD[:, :-1]
    return masked_mean(squared_BTLD, pair_mask_BTLD, total=total)


def diversity_loss(logits_BTLDE: Tensor, valid_BTLD: Tensor, marginal_LDE: Tensor, total: Total = local) -> Tensor:
    """Anti-collapse: the batch's mean prediction per (l, d) should match the router's observed marginal m.

    qbar_l,d = mean over valid (b, t) of softmax(logits); loss = mean over (l, d) cells with any valid token of
    KL(m_l,d || qbar_l,d) = sum_e m_e (log m_e - log qbar_e), with 0 log 0 = 0 and qbar clamped at 1e-12.
    ``marginal_LDE`` rows sum to 1 (rows of cells without valid tokens are ignored). qbar's sum and count go through
    ``total``; the mean over cells does not (every rank has the same cells then).
    """
    _check_prediction(logits_BTLDE, valid_BTLD)
    assert marginal_LDE.shape == logits_BTLDE.shape[2:], (
        f"marginal {tuple(marginal_LDE.shape)} vs logits {tuple(logits_BTLDE.shape)}"
    )
    q_BTLDE = _clean_log_probs(logits_BTLDE, valid_BTLD).exp()
    count_LD = total(valid_BTLD.sum((0, 1)))
    summed_LDE = total(torch.where(valid_BTLD[..., None], q_BTLDE, 0.0).sum((0, 1)))
    mean_LDE = summed_LDE / count_LD.clamp_min(1).float()[..., None]
    cell_LD = count_LD > 0
    m_LDE = torch.where(cell_LD[..., None], marginal_LDE.float(), 0.0)
    kl_LD = (torch.xlogy(m_LDE, m_LDE) - m_LDE * mean_LDE.clamp_min(1e-12).log()).sum(-1)
    return masked_mean(kl_LD, cell_LD)


def combine(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Total loss = sum over terms with nonzero weight of weight * term (a term absent from ``weights`` weighs 0).

    Zero-weighted terms are skipped, so they may be logged without affecting the total (or its NaN-ness).
    """
    unknown = sorted((set(terms) | set(weights)) - set(LOSS_TERMS))
    if unknown:
        raise ValueError(f"unknown loss term(s) {unknown}; known terms are {LOSS_TERMS}")
    active = {name: float(weight) for name, weight in weights.items() if weight != 0}
    for name, weight in active.items():
        if not weight > 0 or weight == float("inf"):
            raise ValueError(f"loss weight for {name!r} is {weight}; weights must be finite and >= 0")
        if name not in terms:
            raise ValueError(
                f"loss term {name!r} has weight {weight} but was not computed; pass it or set its weight 0"
            )
    if not active:
        raise ValueError(f"every loss weight is zero ({dict(weights)}); give at least one of {LOSS_TERMS} a weight")
    return sum(weight * terms[name].float() for name, weight in active.items())

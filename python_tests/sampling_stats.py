"""Statistics helpers of the sampling tests: transformers' warpers as the ground truth and
Pearson's chi-square test against an exact law."""

import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def hf_filter(scores, temperature, top_k=None, top_p=None, min_keep=1):
    """transformers' warpers in GenerationConfig's order (temperature, top-k, top-p)."""
    scores = TemperatureLogitsWarper(float(temperature))(None, scores.float().clone())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k, min_tokens_to_keep=min_keep)(None, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep)(None, scores)
    return scores


def chi2_sf(x: float, df: int) -> float:
    """P(chi2_df > x), the regularised upper incomplete gamma function Q(df / 2, x / 2)."""
    f64 = torch.float64
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=f64),
                                         torch.tensor(x / 2, dtype=f64)))


def chi_square_p(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of samples [N, k] (tokens) against the exact law probs [V] * k; cells with
    an expected count below 5 are pooled into one. 0 when a sample has probability 0."""
    V, k = probs.shape[0], samples.shape[1]
    flat = torch.zeros(samples.shape[0], dtype=torch.long)
    for j in range(k):
        flat = flat * V + samples[:, j].cpu()
    counts = torch.bincount(flat, minlength=V**k).double()
    expected = samples.shape[0] * probs.flatten().double()
    if bool((counts[probs.flatten() == 0] > 0).any()):
        return 0.0
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return chi2_sf(stat, int(keep.sum()) - 1)

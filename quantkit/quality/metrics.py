"""Pure numpy measures of one distribution against another: log-softmax, KL-divergence, top-1 agreement.

A leaf: nothing here imports the rest of quantkit, so evaluation, verification and size targeting share it
without importing each other.
"""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Log-softmax over the last axis in `dtype`, with two passes over the data."""
    shifted = x.astype(dtype, copy=False) - x.max(-1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(-1, keepdims=True))
    shifted -= lse
    return shifted


def top_k(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` largest log-probabilities of each row (unordered) and their column indices."""
    idx = np.argpartition(-logp, k, axis=-1)[..., :k]
    return idx, np.take_along_axis(logp, idx, -1)


def kld_full(prob: np.ndarray, negent: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(p‖q) per row from p, Σ p·log p (cached with the reference) and log q."""
    return negent - np.einsum("ij,ij->i", prob, logq)


def logsumexp(x: np.ndarray) -> np.ndarray:
    """log Σ exp over the last axis: one float32 pass over the data, the sums in float64."""
    top = x.max(-1, keepdims=True)
    sums = np.exp(x - top).sum(-1, dtype=np.float64)
    return np.log(sums) + top[..., 0].astype(np.float64)


def kld_top(top_ids: np.ndarray, top_logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(p‖q) per row from p's top-k log-probabilities and the tail mass beyond them (a lower bound of the
    full KL-divergence, tight when the top k hold most of p)."""
    return kld_top_q(top_logp, np.take_along_axis(logq, top_ids, -1))


def kld_top_q(top_logp: np.ndarray, lq_top: np.ndarray) -> np.ndarray:
    """`kld_top` from q's log-probabilities at p's top-k columns alone (no full log q needed)."""
    p_top, q_top = np.exp(top_logp), np.exp(lq_top)
    p_tail = np.clip(1.0 - p_top.sum(-1), 1e-12, None)
    q_tail = np.clip(1.0 - q_top.sum(-1), 1e-12, None)
    return (p_top * (top_logp - lq_top)).sum(-1) + p_tail * (np.log(p_tail) - np.log(q_tail))


def top1_agreement(ref_argmax: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per row: does the artifact's most likely token equal the reference's."""
    return logits.argmax(-1) == ref_argmax


def top2_gap(logp: np.ndarray) -> np.ndarray:
    """Per row: how far the most likely entry is above the second (a measure of near-ties)."""
    two = -np.partition(-logp, 1, axis=-1)[..., :2]
    return two[..., 0] - two[..., 1]

"""The SAAL loss in PyTorch, written independently of the JAX version."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def saal_loss_torch(heads: Sequence[torch.Tensor], labels: torch.Tensor, alpha_raw: torch.Tensor,
                    beta_raw: torch.Tensor, class_counts: torch.Tensor, log_zero: float = -4.0,
                    normalize_weights: bool = False) -> torch.Tensor:
  """Eq. 10 summed over heads, written independently of the JAX version."""
  alpha = torch.sigmoid(alpha_raw)
  w = (1 - alpha) / (1 - alpha ** class_counts)
  if normalize_weights:
    w = len(class_counts) * w / w.sum()
  total = 0.0
  for i, logits in enumerate(heads):
    p = torch.softmax(logits, -1)
    onehot = F.one_hot(labels, logits.shape[-1]).to(p.dtype)
    dce = -(w * onehot * torch.log_softmax(logits, -1)).sum(-1)
    log_q = torch.where(onehot > 0, torch.zeros_like(p), torch.full_like(p, log_zero))
    drce = -(w * p * log_q).sum(-1)
    total = total + (dce + torch.sigmoid(beta_raw[i]) * drce).mean()
  return total

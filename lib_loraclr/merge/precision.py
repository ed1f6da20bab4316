"""Which float type the merge's solve works in on its device (the precision policy).

The solve forms its constants (the expansion around the start, the least-squares system) from
float32 statistics. Near a good fit the loss is a small difference of large terms, which is why
this used to be float64 everywhere. That is free on a CPU and on datacenter GPUs (FP64 at half
the FP32 rate) but costs 80 % of the linear algebra on a consumer GPU (FP64 at 1/64), and Apple's
MPS and DirectML have no float64 at all. So:

- ``float64`` where it is fast and present: the CPU, CUDA parts with full-rate FP64
  (compute capability 6.0 P100, 7.0 V100, 8.0 A100/A30, 9.0 H100/H200);
- ``float32`` elsewhere. The solve is written so float32 loses nothing that float64 kept: every
  constant is formed from differences that carry no base weight (``W0 - M_j = D0 - w_j dW_j``,
  residual rows, the least-squares right-hand side ``sum_k G_k (w_k dW_k)^T``), and the
  least-squares Cholesky gets one refinement step;
- the small ``(L, K, K)`` pieces (distances, losses, keep-best) are float64 in both, on the
  merge device when it has float64, else on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lib_loraclr.errors import LoraClrError

PRECISIONS = ("auto", "float64", "float32")
FULL_RATE_FP64 = frozenset({(6, 0), (7, 0), (8, 0), (9, 0)})  # CUDA compute capabilities
_HAS_FLOAT64 = frozenset({"cpu", "cuda", "meta"})  # device types with float64 kernels


@dataclass(frozen=True)
class Precision:
    """The policy chosen for one merge device."""

    name: str  # "float64" or "float32": the type the solve's constants are formed in
    exact: torch.dtype  # that type
    small: torch.device  # where the float64 (L, K, K) pieces live

    def small64(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as a float64 small piece (distances, losses): moved first, then widened, so a
        device without float64 never holds one."""
        return tensor.to(device=self.small).to(dtype=torch.float64)


def full_rate_fp64(device: torch.device) -> bool:
    """Whether ``device`` runs float64 at (about) half its float32 rate: the CPU and datacenter GPUs."""
    if device.type == "cpu":
        return True
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return tuple(torch.cuda.get_device_capability(device)) in FULL_RATE_FP64


def precision_for(device: torch.device | str, policy: str = "auto") -> Precision:
    """The precision of a merge on ``device`` under ``policy`` (``auto``, ``float64``, ``float32``)."""
    device = torch.device(device)
    if policy not in PRECISIONS:
        raise LoraClrError(f"merge precision {policy!r} is not one of {', '.join(PRECISIONS)}")
    has64 = device.type in _HAS_FLOAT64
    if policy == "float64" and not has64:
        raise LoraClrError(
            f"the merge device {device} has no float64; use precision 'auto' or 'float32' "
            "(the float32 solve is written for it), or merge on the CPU"
        )
    name = policy if policy != "auto" else ("float64" if full_rate_fp64(device) else "float32")
    exact = torch.float64 if name == "float64" else torch.float32
    return Precision(name, exact, device if has64 else torch.device("cpu"))

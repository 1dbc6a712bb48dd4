"""What a run trains with besides the model: the paper's SGD (section 5), the device, the autocast dtype, and the
seed of each optimizer step."""

from __future__ import annotations

import inspect
import os

import numpy as np
import torch

from repro.errors import UserError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device = {name!r} but no CUDA device is visible; use --set train.device=cpu")
    return torch.device(name)


def configure_device(device: torch.device) -> None:
    """cuDNN picks the fastest convolution algorithms for the run's shapes (measured once per shape)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def step_seed(seed: int, epoch: int, batch: int) -> int:
    """The torch seed of one optimizer step, the same on every rank: dropout and lighting noise repeat wherever a run
    resumes, and, drawn for the whole global batch (repro.models.layers.GlobalBatchDropout), at any world size."""
    return int(np.random.SeedSequence([seed, epoch, batch]).generate_state(1)[0])


def make_optimizer(model: torch.nn.Module, t) -> torch.optim.SGD:
    """SGD with momentum; weight decay on the weights, and on the biases only with `train.decay_biases`."""
    # torch's SGD adds weight_decay * w to the gradient before momentum: v <- 0.9 v + (g + wd w), w <- w - lr v.
    # The paper's rule is v <- 0.9 v - wd*lr*w - lr*g, w <- w + v: the same iterates while lr is constant
    # (torch's v is the paper's v / -lr); after an lr drop torch's momentum carries the old gradients at the new lr.
    # Caffe's reference AlexNet (decay_mult 0 on biases) and cuda-convnet's layer files decay weights only.
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups = [{"params": weights, "weight_decay": t.weight_decay},
              {"params": biases, "weight_decay": t.weight_decay if t.decay_biases else 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=t.lr, momentum=t.momentum,
                           **_update_kernel(weights + biases))


def _update_kernel(params: list[torch.Tensor]) -> dict:
    """One fused kernel for the whole update on CUDA (where this torch's SGD has one), else the multi-tensor
    (foreach) update: the same arithmetic as one update per tensor, in fewer calls."""
    on_cuda = bool(params) and params[0].device.type == "cuda"
    if on_cuda and "fused" in inspect.signature(torch.optim.SGD).parameters:
        return {"fused": True}
    return {"foreach": True}

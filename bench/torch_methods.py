"""PyTorch + timm reference training steps of DINO and Barlow Twins, the yardsticks of bench/method_step.py.

Written from the official code (facebookresearch/dino main_dino.py, utils.py and vision_transformer.py's DINOHead;
facebookresearch/barlowtwins main.py), with the shapes and settings our JAX steps use (cass_jax/methods/dino.py,
barlow_twins.py and their `config.dino` / `config.barlow_twins` blocks), so both sides do the same work:

DINO (`DinoReference`): student = MultiCropWrapper(backbone, DINOHead) over all crops, one backbone pass per
resolution group (the global crops, then the local crops) and one head pass over the concatenated features;
teacher = the same network, loaded from the student, forward on the global crops only (train mode, no grad, its
BatchNorm statistics updating, as upstream); DINOLoss (student temperature 0.1, teacher temperature 0.04, centring
with momentum 0.9); AdamW over get_params_groups' two groups with the cosine lr / weight-decay schedules;
clip_gradients (each tensor to norm 3.0); cancel_gradients_last_layer; the teacher's EMA with the cosine momentum.
DINOHead: Linear-GELU-Linear-GELU-Linear (hidden 2048, bottleneck 256, trunc_normal(.02)), L2 normalisation, a
weight-normalised Linear to out_dim whose scale is frozen with norm_last_layer.

Barlow Twins (`BarlowTwinsReference`): backbone -> projector (Linear without bias, BatchNorm1d, ReLU per hidden
width, then a Linear without bias), each view in its own pass; C = bn(z1).T @ bn(z2) / batch with an affine-free
BatchNorm1d; loss sum (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2 (lambda 0.0051); LARS (momentum 0.9, eta 0.001,
weight decay 1e-6) with biases and BatchNorm parameters neither decayed nor adapted and on their own learning
rate (0.0048 against 0.2 per 256 images), set per step by adjust_learning_rate's warm-up + cosine.

Where this departs from the official code (each time to match our JAX step):
- fp32 in one process: no autocast / GradScaler (DINO's use_fp16, Barlow Twins' AMP), no DDP, SyncBatchNorm or
  all_reduce (one process's sums are the global ones).
- Backbones are timm's (`pretrained=False`), named as in our registry: ViTs with `dynamic_img_size=True`, which
  resamples the position embeddings bicubically for the local crops as DINO's interpolate_pos_encoding does;
  ResNets are timm's, not torchvision's (same layers; official Barlow Twins uses a torchvision ResNet-50).
- The DINO student has no stochastic depth (official: drop_path_rate 0.1 for ViTs); our ViT has none.
- Schedules span our benchmark's 100 epochs x 100 steps (official Barlow Twins: 1000 epochs); only values change.
- The DINO head's last layer uses `torch.nn.utils.parametrizations.weight_norm`, the maintained form of the
  `nn.utils.weight_norm` the official code calls (same g * v / ||v|| per output unit).
- clip_gradients and the teacher EMA run as `torch._foreach_*` ops: the official per-tensor loops' arithmetic
  (scale by max_norm / (||g|| + 1e-6) only where that is < 1; t = m t + (1 - m) s) without a host sync per tensor.
Timing-relevant choices of the caller (bench/method_step.py): `freeze_last_layer=0`, so the last layer trains from
the first measured step, as in every epoch after the first (both sides).
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import timm
import torch
from torch import nn
from torch.nn import functional as F

LAMBDA = 0.0051
EPOCHS, STEPS_PER_EPOCH = 100, 100  # the schedules' length: the values the steps read, not how many run


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """DINO's per-step schedule: linear warm-up, then a half cosine from base_value to final_value."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


def create_backbone(name: str, image_size: int) -> nn.Module:
    """A timm backbone without its classifier (pooled features out), random weights; ViTs read any multiple of
    the patch size, their position embeddings resampled from an `image_size` grid."""
    kwargs = dict(img_size=image_size, dynamic_img_size=True) if name.startswith("vit") else {}
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised Linear to out_dim (DINO's projection head)."""

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        widths = [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for index, width in enumerate(widths):
            layers.append(nn.Linear(in_dim if index == 0 else widths[index - 1], width))
            if index < len(widths) - 1:
                layers += [nn.BatchNorm1d(width)] if use_bn else []
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        scale = self.last_layer.parametrizations.weight.original0
        scale.data.fill_(1.0)
        scale.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropWrapper(nn.Module):
    """The backbone once per run of equal-resolution crops (concatenated), the head once on all features."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        groups = [list(group) for _, group in itertools.groupby(crops, key=lambda crop: crop.shape[-1])]
        return self.head(torch.cat([self.backbone(torch.cat(group)) for group in groups]))


class DINOLoss(nn.Module):
    """Cross-entropy of the centred, sharpened teacher softmax against the student's, over (global, other) pairs."""

    def __init__(self, out_dim: int, ncrops: int, teacher_temp_schedule: np.ndarray, num_global_crops: int = 2,
                 student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.ncrops, self.num_global_crops = ncrops, num_global_crops
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.teacher_temp_schedule = teacher_temp_schedule
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temperature = float(self.teacher_temp_schedule[epoch])
        teacher_out = F.softmax((teacher_output - self.center) / temperature, dim=-1).detach()
        terms = [torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                 for iq, q in enumerate(teacher_out.chunk(self.num_global_crops))
                 for v in range(self.ncrops) if v != iq]
        self.update_center(teacher_output)
        return sum(terms) / len(terms)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = teacher_output.sum(dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def dino_params_groups(model: nn.Module) -> list[dict]:
    """get_params_groups: weight decay on trainable tensors other than biases and 1-D ones."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or param.ndim == 1 else regularized).append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> None:
    """utils.clip_gradients: each gradient tensor alone scaled to norm `clip` when above it."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = torch._foreach_norm(grads, 2)
    coefficients = [torch.clamp(clip / (norm + 1e-6), max=1.0) for norm in norms]
    torch._foreach_mul_(grads, coefficients)


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """utils.cancel_gradients_last_layer: no update of the head's last layer in the first epochs."""
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


class DinoReference:
    """One main_dino.py training iteration per `step()`, on fixed random crops (NCHW, fp32)."""

    def __init__(self, backbone: str, batch: int, global_crop_size: int = 224, local_crop_size: int = 96,
                 local_crops_number: int = 8, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, use_bn_in_head: bool = False, norm_last_layer: bool = True,
                 lr: float = 0.0005, min_lr: float = 1e-6, warmup_epochs: int = 10, weight_decay: float = 0.04,
                 weight_decay_end: float = 0.4, momentum_teacher: float = 0.996, teacher_temp: float = 0.04,
                 clip_grad: float = 3.0, freeze_last_layer: int = 0, device: str = "cpu", seed: int = 0):
        torch.manual_seed(seed)
        self.device = torch.device(device)

        def network(norm_last: bool) -> MultiCropWrapper:
            body = create_backbone(backbone, global_crop_size)
            head = DINOHead(body.num_features, out_dim, use_bn=use_bn_in_head, norm_last_layer=norm_last,
                            hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim)
            return MultiCropWrapper(body, head).to(self.device).train()

        self.student, self.teacher = network(norm_last_layer), network(True)
        self.teacher.load_state_dict(self.student.state_dict())
        for param in self.teacher.parameters():
            param.requires_grad = False
        ncrops = 2 + local_crops_number
        self.loss = DINOLoss(out_dim, ncrops, np.full(EPOCHS, teacher_temp)).to(self.device)
        self.optimizer = torch.optim.AdamW(dino_params_groups(self.student))
        self.lr_schedule = cosine_scheduler(lr * batch / 256.0, min_lr, EPOCHS, STEPS_PER_EPOCH,
                                            warmup_epochs=warmup_epochs)
        self.wd_schedule = cosine_scheduler(weight_decay, weight_decay_end, EPOCHS, STEPS_PER_EPOCH)
        self.momentum_schedule = cosine_scheduler(momentum_teacher, 1.0, EPOCHS, STEPS_PER_EPOCH)
        self.clip_grad, self.freeze_last_layer = clip_grad, freeze_last_layer
        generator = torch.Generator().manual_seed(seed)
        sizes = [global_crop_size] * 2 + [local_crop_size] * local_crops_number
        self.crops = [torch.randn(batch, 3, size, size, generator=generator).to(self.device) for size in sizes]
        self.iteration = 0

    def parameter_count(self) -> int:
        """The student's parameters (backbone + head, the frozen scale included), as our state.params counts."""
        return sum(p.numel() for p in self.student.parameters())

    def step(self) -> float:
        it = self.iteration
        epoch = it // STEPS_PER_EPOCH
        for index, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.lr_schedule[it]
            if index == 0:
                group["weight_decay"] = self.wd_schedule[it]
        with torch.no_grad():
            teacher_output = self.teacher(self.crops[:2])
        student_output = self.student(self.crops)
        loss = self.loss(student_output, teacher_output, epoch)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"DINO loss is {value}")
        self.optimizer.zero_grad()
        loss.backward()
        if self.clip_grad:
            clip_gradients(self.student, self.clip_grad)
        cancel_gradients_last_layer(epoch, self.student, self.freeze_last_layer)
        self.optimizer.step()
        with torch.no_grad():
            momentum = float(self.momentum_schedule[it])
            teacher_params = list(self.teacher.parameters())
            torch._foreach_mul_(teacher_params, momentum)
            torch._foreach_add_(teacher_params, list(self.student.parameters()), alpha=1.0 - momentum)
        self.iteration += 1
        return value


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened (a strided view: no mask, no copy of the diagonal)."""
    n, m = matrix.shape
    assert n == m
    return matrix.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def cross_correlation_loss(z1_normalised: torch.Tensor, z2_normalised: torch.Tensor, batch_size: int,
                           lambd: float = LAMBDA) -> torch.Tensor:
    """sum (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2 with C = z1.T @ z2 / batch, of batch-normalised embeddings."""
    c = z1_normalised.T @ z2_normalised
    c.div_(batch_size)
    on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
    off_diag = off_diagonal(c).pow_(2).sum()
    return on_diag + lambd * off_diag


class BarlowTwins(nn.Module):
    """Backbone + projector; `forward(y1, y2)` is the Barlow Twins loss of the two views."""

    def __init__(self, backbone: str, image_size: int, projector: Sequence[int], batch_size: int,
                 lambd: float = LAMBDA):
        super().__init__()
        self.backbone = create_backbone(backbone, image_size)
        sizes = [self.backbone.num_features, *projector]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 2):
            layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1]), nn.ReLU(True)]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)
        self.bn = nn.BatchNorm1d(sizes[-1], affine=False)
        self.batch_size, self.lambd = batch_size, lambd

    def forward(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        z1 = self.projector(self.backbone(y1))
        z2 = self.projector(self.backbone(y2))
        return cross_correlation_loss(self.bn(z1), self.bn(z2), self.batch_size, self.lambd)


class LARS(torch.optim.Optimizer):
    """Barlow Twins' LARS: dp = g + wd p; dp *= eta ||p|| / ||dp||; mu = m mu + dp; p -= lr mu. Tensors the
    filters pick (1-D: biases, BatchNorm) skip the decay and the trust ratio."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001,
                 weight_decay_filter=None, lars_adaptation_filter=None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                                      weight_decay_filter=weight_decay_filter,
                                      lars_adaptation_filter=lars_adaptation_filter))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if group["weight_decay_filter"] is None or not group["weight_decay_filter"](p):
                    dp = dp.add(p, alpha=group["weight_decay"])
                if group["lars_adaptation_filter"] is None or not group["lars_adaptation_filter"](p):
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(param_norm > 0.0,
                                        torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one),
                                        one)
                    dp = dp.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])


def exclude_bias_and_norm(param: torch.Tensor) -> bool:
    return param.ndim == 1


class BarlowTwinsReference:
    """One barlowtwins main.py training iteration per `step()`, on two fixed random views (NCHW, fp32)."""

    def __init__(self, backbone: str, batch: int, crop_size: int = 224, projector: Sequence[int] = (8192, 8192, 8192),
                 lambd: float = LAMBDA, learning_rate_weights: float = 0.2, learning_rate_biases: float = 0.0048,
                 weight_decay: float = 1e-6, warmup_epochs: int = 10, device: str = "cpu", seed: int = 0):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.model = BarlowTwins(backbone, crop_size, projector, batch, lambd).to(self.device).train()
        weights = [p for p in self.model.parameters() if p.ndim != 1]
        biases = [p for p in self.model.parameters() if p.ndim == 1]
        self.optimizer = LARS([{"params": weights}, {"params": biases}], lr=0, weight_decay=weight_decay,
                              weight_decay_filter=exclude_bias_and_norm, lars_adaptation_filter=exclude_bias_and_norm)
        self.batch, self.warmup_epochs = batch, warmup_epochs
        self.learning_rates = (learning_rate_weights, learning_rate_biases)
        generator = torch.Generator().manual_seed(seed)
        self.views = [torch.randn(batch, 3, crop_size, crop_size, generator=generator).to(self.device)
                      for _ in range(2)]
        self.iteration = 0

    def parameter_count(self) -> int:
        """Encoder + projector parameters, as our state.params counts."""
        return sum(p.numel() for p in self.model.parameters())

    def adjust_learning_rate(self, step: int) -> None:
        """main.py's schedule: linear warm-up over warmup_epochs, then a cosine to 1/1000, times batch / 256."""
        max_steps, warmup_steps = EPOCHS * STEPS_PER_EPOCH, self.warmup_epochs * STEPS_PER_EPOCH
        base_lr = self.batch / 256
        if step < warmup_steps:
            lr = base_lr * step / warmup_steps
        else:
            q = 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (max_steps - warmup_steps)))
            lr = base_lr * q + base_lr * 0.001 * (1 - q)
        for group, base in zip(self.optimizer.param_groups, self.learning_rates):
            group["lr"] = lr * base

    def step(self) -> float:
        self.adjust_learning_rate(self.iteration)
        self.optimizer.zero_grad()
        loss = self.model(*self.views)
        loss.backward()
        self.optimizer.step()
        self.iteration += 1
        return loss.item()

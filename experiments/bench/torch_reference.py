"""PyTorch reference of the authors' approach, for the speed comparison only.

The authors' code (eladhoffer/bigBatch) trains large batches in PyTorch in two ways,
both written here from the paper's description:

* ``GhostBatchNorm``: a Python loop over contiguous chunks of ``ghost_batch_size``
  examples, each normalized by ``F.batch_norm`` with its own statistics (and updating
  the running statistics once per chunk, in order), the outputs concatenated.
* Gradient accumulation over chunks: the large batch is split into chunks of |B_S|,
  each chunk runs forward and backward through an ordinary ``nn.BatchNorm`` (which then
  sees exactly one ghost batch), gradients add up, and one optimizer step follows.

Both end in clipping by global norm (5) and SGD with momentum and weight decay, the
optimizer the paper uses. The networks match ``gbn_jax.models`` ("f1" and
"resnet_cifar" depth 44 with projection shortcuts): same layer shapes and parameter
counts (1,462,794 and 661,338), so the timings compare equal work.

Nothing in the library imports this file; torch is the ``bench`` extra of
pyproject.toml (``pip install torch==2.13.0``).

References:
  Hoffer, Hubara & Soudry (2017), section 4 (Algorithm 1) and section 5.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("bn", "gbn_loop", "chunk_accum")


class GhostBatchNorm(nn.BatchNorm2d):
    """Batch norm over contiguous chunks of the batch, as a Python loop (the reference).

    Inherits ``nn.BatchNorm2d``'s parameters and buffers; ``_check_input_dim`` is
    relaxed so that the same class serves 2-D (dense) and 4-D (conv) inputs.

    Args:
      num_features: channels (conv) or features (dense).
      ghost_batch_size: examples per ghost batch, |B_S|.
      **kwargs: ``nn.BatchNorm2d`` options (eps, momentum, ...).

    References:
      Hoffer, Hubara & Soudry (2017), section 4, Algorithm 1.
    """

    def __init__(self, num_features: int, ghost_batch_size: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.ghost_batch_size = ghost_batch_size

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected a 2-D or 4-D input, got {x.dim()=}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] <= self.ghost_batch_size:
            return super().forward(x)
        # One F.batch_norm per chunk; each call updates the running statistics in turn,
        # which is Algorithm 1's sequential update.
        chunks = x.split(self.ghost_batch_size, dim=0)
        return torch.cat(
            [
                F.batch_norm(
                    c,
                    self.running_mean,
                    self.running_var,
                    self.weight,
                    self.bias,
                    True,
                    self.momentum,
                    self.eps,
                )
                for c in chunks
            ],
            dim=0,
        )


def _norm(kind: str, ghost_batch_size: int | None, dims: int) -> Callable[[int], nn.Module]:
    if kind == "ghost":
        return lambda n: GhostBatchNorm(n, ghost_batch_size)
    return nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d


class F1(nn.Module):
    """Flatten, 5 x [Linear 512, norm, ReLU], Linear 10 (Keskar et al.'s F1)."""

    def __init__(self, norm: str = "batch", ghost_batch_size: int | None = None) -> None:
        super().__init__()
        make = _norm(norm, ghost_batch_size, 1)
        layers, width = [nn.Flatten()], 784
        for _ in range(5):
            layers += [nn.Linear(width, 512), make(512), nn.ReLU(inplace=True)]
            width = 512
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """conv3x3-norm-ReLU-conv3x3-norm, add (projection where the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, make: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = make(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = make(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), make(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)), inplace=True)
        y = self.norm2(self.conv2(y))
        return F.relu(y + (x if self.proj is None else self.proj(x)), inplace=True)


class ResNetCifar(nn.Module):
    """CIFAR ResNet of depth 6n + 2 (44 by default) with projection shortcuts."""

    def __init__(
        self, depth: int = 44, norm: str = "batch", ghost_batch_size: int | None = None
    ) -> None:
        super().__init__()
        make = _norm(norm, ghost_batch_size, 2)
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), make(16), nn.ReLU())
        blocks, cin = [], 16
        for stage in range(3):
            cout = 16 * 2**stage
            for b in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if stage and not b else 1, make))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(x.mean((2, 3)))


def get_model(name: str, norm: str = "batch", ghost_batch_size: int | None = None) -> nn.Module:
    """Builds "f1" or "resnet44" with "batch" (nn.BatchNorm) or "ghost" (chunk loop) norm."""
    if name == "f1":
        return F1(norm, ghost_batch_size)
    if name in ("resnet44", "resnet_cifar"):
        return ResNetCifar(44, norm, ghost_batch_size)
    raise ValueError(f"Unknown model {name=}; use 'f1' or 'resnet44'.")


def make_train_step(
    model: nn.Module,
    mode: str,
    ghost_batch_size: int,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    grad_clip_norm: float = 5.0,
    autocast_dtype: torch.dtype | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Returns ``step(x, y) -> loss``: forward, backward, clip, SGD update, in place.

    Args:
      model: a model of ``get_model`` (built with norm="ghost" for mode "gbn_loop").
      mode: "bn" (one pass over the whole batch), "gbn_loop" (one pass; the model's
        GhostBatchNorm loops over chunks) or "chunk_accum" (forward and backward per
        chunk of ``ghost_batch_size`` with gradient accumulation, the authors'
        large-batch training loop).
      ghost_batch_size: |B_S|, the chunk size of "chunk_accum".
      lr, momentum, weight_decay: torch.optim.SGD settings (the paper's regime).
      grad_clip_norm: global L2 norm the gradient is clipped to.
      autocast_dtype: e.g. torch.bfloat16 for mixed precision (GPU benchmark).

    Returns:
      The step function; it returns the mean loss of the batch (a 0-d tensor).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown {mode=}; use one of {MODES}.")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    device_type = next(model.parameters()).device.type
    model.train()

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, autocast_dtype, enabled=autocast_dtype is not None):
            return F.cross_entropy(model(x), y)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        if mode == "chunk_accum":
            chunks = list(zip(x.split(ghost_batch_size), y.split(ghost_batch_size), strict=True))
            total = torch.zeros((), device=x.device)
            for xc, yc in chunks:
                # Scaled so the accumulated gradient is that of the batch-mean loss.
                loss = loss_of(xc, yc) / len(chunks)
                loss.backward()
                total += loss.detach()
        else:
            total = loss_of(x, y)
            total.backward()
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        opt.step()
        return total

    return step

"""Model size and cost: parameters and multiply-accumulates per image."""
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int) -> int:
    """MACs of one forward pass on one image (the vision papers' "FLOPs": ResNet-50 ~ 4.1 G).

    torch's FlopCounterMode counts 2 FLOPs per multiply-add of convs and matmuls.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    image = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        model(image)
    model.train(was_training)
    return counter.get_total_flops() // 2

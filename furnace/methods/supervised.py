"""The supervised baseline: the network on labeled images only."""
from typing import Dict, Tuple

import torch
import torch.nn as nn
from easydict import EasyDict

from furnace.amp import autocast
from furnace.methods.base import Method, Terms, finish, supervised_loss


def supervised_step(model: nn.Module, batch: Dict[str, torch.Tensor], C: EasyDict, device: torch.device,
                    world_size: int = 1) -> Tuple[torch.Tensor, Terms]:
    """L = sup_weight * CE(model(x_l), y_l)."""
    with autocast(device, C.amp):
        logits = model(batch["x_l"])
    return finish({"sup": C.sup_weight * supervised_loss(C, logits, batch["y_l"], world_size)})


class Supervised(Method):
    def step(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Terms]:
        return supervised_step(model, batch, self.C, self.info.device, self.info.world_size)


METHOD = Supervised

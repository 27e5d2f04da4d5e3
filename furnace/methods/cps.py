"""Cross pseudo supervision (CPS) with CutMix: how the two teachers are trained."""
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
from easydict import EasyDict

from furnace.amp import autocast
from furnace.data import paste, paste_labels
from furnace.losses import pseudo_label_ce
from furnace.methods.base import Method, Terms, finish, scoped, supervised_loss


class CPSPair(nn.Module):
    """The two branches of CPS: same architecture, different initialisation."""

    def __init__(self, branch_a: nn.Module, branch_b: nn.Module):
        super().__init__()
        self.branch_a, self.branch_b = branch_a, branch_b

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.branch_a(x), self.branch_b(x)


def cps_step(pair: nn.Module, batch: Dict[str, torch.Tensor], C: EasyDict, device: torch.device,
             world_size: int = 1) -> Tuple[torch.Tensor, Terms]:
    """Each branch learns the other's pseudo-label of the mixed image u_m = paste(u0, u1, mask):

        L = sup_weight * (CE(a(x_l), y_l) + CE(b(x_l), y_l)) + cps_weight * (CE(a(u_m), y_b) + CE(b(u_m), y_a)),

    y_a = paste_labels(argmax a(u0), argmax a(u1), mask), without gradient (likewise y_b). pair(x) returns
    the logits of both branches. network_calls='separate' calls the pair on u0, u1, u_m and x_l in turn, as
    published (BatchNorm statistics per call); 'joint' on u0+u1, then on x_l+u_m."""
    x_l, y_l, u0, u1, mask = batch["x_l"], batch["y_l"], batch["u0"], batch["u1"], batch["mask"]
    n_l, n_u = x_l.shape[0], u0.shape[0]
    u_m = paste(u0, u1, mask)
    separate = C.network_calls == "separate"
    with torch.no_grad(), autocast(device, C.amp):
        if separate:
            (a0, b0), (a1, b1) = pair(u0), pair(u1)
        else:
            (a0, a1), (b0, b1) = (t.split(n_u) for t in pair(torch.cat([u0, u1])))
    pseudo_a = paste_labels(a0.argmax(1), a1.argmax(1), mask)
    pseudo_b = paste_labels(b0.argmax(1), b1.argmax(1), mask)
    with autocast(device, C.amp):
        if separate:
            mix_a, mix_b = pair(u_m)
            sup_a, sup_b = pair(x_l)
        else:
            (sup_a, mix_a), (sup_b, mix_b) = (t.split([n_l, n_u]) for t in pair(torch.cat([x_l, u_m])))
    terms = {"sup": C.sup_weight * (supervised_loss(C, sup_a, y_l, world_size)
                                    + supervised_loss(C, sup_b, y_l, world_size))}
    if C.cps_weight > 0:
        terms["cps"] = C.cps_weight * (scoped(C, pseudo_label_ce, mix_a, pseudo_b)
                                       + scoped(C, pseudo_label_ce, mix_b, pseudo_a))
    return finish(terms)


class CPS(Method):
    """Trains a CPSPair; a checkpoint's 'model' is branch a (the teacher MGD loads), 'model_b' branch b."""

    uses_unlabeled = True

    def build_model(self, new_network: Callable[[], nn.Module]) -> nn.Module:
        return CPSPair(new_network(), new_network())

    def deployable(self, model: nn.Module) -> nn.Module:
        return model.branch_a

    def extra_state(self, model: nn.Module) -> dict:
        return {"model_b": model.branch_b.state_dict()}

    def load_state(self, model: nn.Module, ckpt: dict) -> None:
        model.branch_a.load_state_dict(ckpt["model"])
        model.branch_b.load_state_dict(ckpt["model_b"])

    def step(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Terms]:
        return cps_step(model, batch, self.C, self.info.device, self.info.world_size)


METHOD = CPS

"""Cityscapes 1/8: the deep teacher, ResNet-101 (deep stem) DeepLabv3+, trained with CPS (OHEM CE)."""
from furnace.config import new_config

C = new_config("cityscapes", __file__)
C.partition = 8
C.network = "resnet101"
C.pretrained = "{root}/DATA/model-weight/resnet101_v1c.pth"
C.method = "cps"
C.cps_weight = 5.0

C.batch_size = 8                # published: 1 per GPU on 8 GPUs
C.gpu_batch = 1
C.lr = 0.0025                   # published: 0.02 on 8 GPUs on a loss divided by 8 (README, "Learning rate")
C.weight_decay = 8e-4           # published: 1e-4 at 0.02
C.epochs = 137

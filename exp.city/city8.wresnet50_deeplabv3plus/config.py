"""Cityscapes 1/8: the wide teacher, WRN-50-2 DeepLabv3+, trained with CPS (OHEM CE)."""
from furnace.config import new_config

C = new_config("cityscapes", __file__)
C.partition = 8
C.network = "wide_resnet50_2"
C.pretrained = "{root}/DATA/model-weight/wide_resnet50_2.pth"
C.method = "cps"
C.cps_weight = 5.0

C.batch_size = 8                # published: 1 per GPU on 8 GPUs
C.gpu_batch = 1
C.lr = 0.0025                   # published: 0.02 on 8 GPUs on a loss divided by 8 (README, "Learning rate")
C.weight_decay = 8e-4           # published: 1e-4 at 0.02
C.epochs = 137

"""PASCAL VOC 1/8: the deep teacher, ResNet-101 (deep stem) DeepLabv3+, trained with CPS."""
from furnace.config import new_config

C = new_config("voc", __file__)
C.partition = 8
C.network = "resnet101"
C.pretrained = "{root}/DATA/model-weight/resnet101_v1c.pth"  # ImageNet weights, deep-stem ResNet-101
C.method = "cps"
C.cps_weight = 1.0

C.batch_size = 8                # published: 2 per GPU on 4 GPUs
C.lr = 0.0025                   # published: 0.0025 x 4 GPUs on a loss divided by 4 (README, "Learning rate")
C.weight_decay = 4e-4           # published: 1e-4 at 0.0025 x 4
C.epochs = 34

"""Cityscapes 1/8: ResNet-18 (deep stem) DeepLabv3+ student distilled with MGD (OHEM CE on labels)."""
from furnace.config import new_config

C = new_config("cityscapes", __file__)
C.partition = 8
C.network = "resnet18"
C.pretrained = "{root}/DATA/model-weight/resnet18.pth"   # torchvision ImageNet ResNet-18: the deep stem stays random, as published
C.method = "mgd"
C.teacher_deep = "{root}/exp.city/city8.resnet101_deeplabv3plus/output/cps/snapshot/last.pth"
C.teacher_wide = "{root}/exp.city/city8.wresnet50_deeplabv3plus/output/cps/snapshot/last.pth"

C.batch_size = 16               # published: 2 per GPU on 8 GPUs
C.lr = 0.0025                   # published: 0.02 on 8 GPUs on a loss divided by 8 (README, "Learning rate")
C.weight_decay = 8e-4           # published: 1e-4 at 0.02
C.epochs = 137
C.semantic_weight = 0.001       # lambda_1
C.region_weight = 100.0         # lambda_2

"""Cityscapes 1/8: MobileNet-v2 DeepLabv3+ student distilled with MGD (OHEM CE on labels).

No Cityscapes MobileNet-v2 schedule was published: this uses the ResNet-18 Cityscapes schedule with the
loss weights published for the VOC MobileNet-v2 student."""
from furnace.config import new_config

C = new_config("cityscapes", __file__)
C.partition = 8
C.network = "mobilenet_v2"
C.pretrained = "{root}/DATA/model-weight/mobilenet_v2.pth"
C.method = "mgd"
C.teacher_deep = "{root}/exp.city/city8.resnet101_deeplabv3plus/output/cps/snapshot/last.pth"
C.teacher_wide = "{root}/exp.city/city8.wresnet50_deeplabv3plus/output/cps/snapshot/last.pth"

C.batch_size = 16
C.lr = 0.0025                   # as the ResNet-18 student (README, "Learning rate")
C.weight_decay = 8e-4
C.epochs = 137
C.semantic_weight = 0.0005      # lambda_1
C.region_weight = 50.0          # lambda_2

"""PASCAL VOC 1/8: ResNet-18 (deep stem) DeepLabv3+ student distilled with MGD from the two CPS teachers."""
from furnace.config import new_config

C = new_config("voc", __file__)
C.partition = 8
C.network = "resnet18"
C.pretrained = "{root}/DATA/model-weight/resnet18.pth"   # torchvision ImageNet ResNet-18: the deep stem stays random, as published
C.method = "mgd"
C.teacher_deep = "{root}/exp.voc/voc8.resnet101_deeplabv3plus/output/cps/snapshot/last.pth"
C.teacher_wide = "{root}/exp.voc/voc8.wresnet50_deeplabv3plus/output/cps/snapshot/last.pth"

C.batch_size = 8                # published: 2 per GPU on 4 GPUs
C.lr = 0.0025                   # published: 0.0025 x 4 GPUs on a loss divided by 4 (README, "Learning rate")
C.weight_decay = 4e-4           # published: 1e-4 at 0.0025 x 4
C.epochs = 34
C.semantic_weight = 0.002       # lambda_1
C.region_weight = 100.0         # lambda_2

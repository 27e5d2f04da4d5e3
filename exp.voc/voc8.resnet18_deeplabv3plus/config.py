"""PASCAL VOC 1/8: ResNet-18 (deep stem) DeepLabv3+ student distilled with MGD from the two CPS teachers."""
from furnace.config import new_config

C = new_config("voc", __file__)
C.partition = 8
C.network = "resnet18"
C.pretrained = "{root}/DATA/model-weight/resnet18_v1c.pth"   # ImageNet weights, deep-stem ResNet-18
C.method = "mgd"
C.teacher_deep = "{root}/exp.voc/voc8.resnet101_deeplabv3plus/output/cps/snapshot/last.pth"
C.teacher_wide = "{root}/exp.voc/voc8.wresnet50_deeplabv3plus/output/cps/snapshot/last.pth"

C.batch_size = 8                # published: 2 per GPU on 4 GPUs
C.lr = 0.0025 * 4               # published: 0.0025 per GPU
C.epochs = 34
C.semantic_weight = 0.002       # lambda_1
C.region_weight = 100.0         # lambda_2

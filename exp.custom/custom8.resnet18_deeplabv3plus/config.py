"""Your own data (DATA/custom, prepared by tools/prepare_custom.py), 1/8 labeled: ResNet-18 (deep stem)
DeepLabv3+ student distilled with MGD from the two CPS teachers of exp.custom. Classes and colours come from
the data folder; the schedule is VOC's."""
from furnace.config import new_config

C = new_config("custom", __file__)
C.data_root = "{root}/DATA/custom"
C.partition = 8
C.network = "resnet18"
C.pretrained = "{root}/DATA/model-weight/resnet18.pth"
C.method = "mgd"
C.teacher_deep = "{root}/exp.custom/custom8.resnet101_deeplabv3plus/output/cps/snapshot/last.pth"
C.teacher_wide = "{root}/exp.custom/custom8.wresnet50_deeplabv3plus/output/cps/snapshot/last.pth"
C.batch_size, C.lr, C.weight_decay, C.epochs = 8, 0.0025, 4e-4, 34

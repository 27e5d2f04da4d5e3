"""Your own data (DATA/custom, prepared by tools/prepare_custom.py), 1/8 labeled: the deep teacher,
ResNet-101 (deep stem) DeepLabv3+, trained with CPS. The schedule is VOC's."""
from furnace.config import new_config

C = new_config("custom", __file__)
C.data_root = "{root}/DATA/custom"
C.partition = 8
C.network = "resnet101"
C.pretrained = "{root}/DATA/model-weight/resnet101_v1c.pth"
C.method = "cps"
C.batch_size, C.lr, C.weight_decay, C.epochs = 8, 0.0025, 4e-4, 34

"""Your own data (DATA/custom, prepared by tools/prepare_custom.py), 1/8 labeled: the wide teacher,
WRN-50-2 DeepLabv3+, trained with CPS. The schedule is VOC's."""
from furnace.config import new_config

C = new_config("custom", __file__)
C.data_root = "{root}/DATA/custom"
C.partition = 8
C.network = "wide_resnet50_2"
C.pretrained = "{root}/DATA/model-weight/wide_resnet50_2.pth"
C.method = "cps"
C.batch_size, C.lr, C.weight_decay, C.epochs = 8, 0.001, 4e-4, 34

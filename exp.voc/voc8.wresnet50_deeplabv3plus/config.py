"""PASCAL VOC 1/8: the wide teacher, WRN-50-2 DeepLabv3+, trained with CPS."""
from furnace.config import new_config

C = new_config("voc", __file__)
C.partition = 8
C.network = "wide_resnet50_2"
C.pretrained = "{root}/DATA/model-weight/wide_resnet50_2.pth"  # ImageNet weights (torchvision or timm file)
C.method = "cps"
C.cps_weight = 1.0

C.batch_size = 8                # published: 2 per GPU on 4 GPUs
C.lr = 0.001                    # published: 0.001 x 4 GPUs on a loss divided by 4 (README, "Learning rate")
C.weight_decay = 4e-4           # published: 1e-4 at 0.001 x 4
C.epochs = 34

"""PASCAL VOC 1/8: MobileNet-v2 DeepLabv3+ student distilled with MGD from the two CPS teachers."""
from furnace.config import new_config

C = new_config("voc", __file__)
C.partition = 8
C.network = "mobilenet_v2"
C.pretrained = "{root}/DATA/model-weight/mobilenet_v2.pth"   # ImageNet weights (torchvision or timm file)
C.method = "mgd"
C.teacher_deep = "{root}/exp.voc/voc8.resnet101_deeplabv3plus/output/cps/snapshot/last.pth"
C.teacher_wide = "{root}/exp.voc/voc8.wresnet50_deeplabv3plus/output/cps/snapshot/last.pth"

C.batch_size = 8                # published: 2 per GPU on 4 GPUs
C.lr = 0.0035                   # published: 0.0035 x 4 GPUs on a loss divided by 4 (README, "Learning rate")
C.weight_decay = 4e-4           # published: 1e-4 at 0.0035 x 4
C.epochs = 34
C.semantic_weight = 0.0005      # lambda_1
C.region_weight = 50.0          # lambda_2

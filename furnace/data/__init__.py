"""Data: image/label IO, VOC, Cityscapes and custom datasets, transforms, CutMix box masks, palettes, splits."""
from .cityscapes_labels import CITYSCAPES_CLASS_NAMES, CITYSCAPES_PALETTE, label_ids_to_train_ids
from .cutmix import cutmix_box_mask, paste, paste_labels
from .datasets import (CityscapesDataset, CustomDataset, DatasetError, SegmentationDataset, VOCDataset, build_dataset,
                       check_dataset)
from .io import image_size, read_image, read_label, write_label
from .palette import VOC_PALETTE, voc_palette
from .splits import partition, partition_paths, read_list, write_list, write_partitions
from .transforms import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, TrainTransform, ValTransform, normalize

VOC_CLASS_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]

__all__ = [
    "read_image", "read_label", "write_label", "image_size",
    "VOCDataset", "CityscapesDataset", "CustomDataset", "SegmentationDataset", "DatasetError", "build_dataset", "check_dataset",
    "TrainTransform", "ValTransform", "normalize", "IMAGENET_MEAN", "IMAGENET_STD", "IGNORE_INDEX",
    "cutmix_box_mask", "paste", "paste_labels",
    "VOC_PALETTE", "voc_palette", "CITYSCAPES_PALETTE", "VOC_CLASS_NAMES", "CITYSCAPES_CLASS_NAMES",
    "label_ids_to_train_ids",
    "read_list", "write_list", "partition", "partition_paths", "write_partitions",
]

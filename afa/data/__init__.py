"""Data: the VOC-style dataset, its transforms, and the synthetic demo set."""

from afa.data.build import build_datasets, class_names
from afa.data.transforms import Augment, denormalize, normalize
from afa.data.voc import (
    DataError,
    VOCStyleDataset,
    labels_from_mask,
    make_generator,
    make_loader,
    read_image,
    read_label_file,
    read_mask,
    read_name_list,
    seed_worker,
    write_label_file,
    write_mask,
    write_name_list,
)

__all__ = [
    "Augment",
    "DataError",
    "VOCStyleDataset",
    "build_datasets",
    "class_names",
    "denormalize",
    "labels_from_mask",
    "make_generator",
    "make_loader",
    "normalize",
    "read_image",
    "read_label_file",
    "read_mask",
    "read_name_list",
    "seed_worker",
    "write_label_file",
    "write_mask",
    "write_name_list",
]

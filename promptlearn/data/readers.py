"""Every dataset reader; importing this module registers them with promptlearn.data.registry.

CoOp's benchmark layouts live in coop_readers, the image-folder and CSV readers (and the file
helpers all readers share) in generic_readers.
"""
from promptlearn.data.coop_readers import (
    IMAGENET_VARIANTS,
    SPLIT_FILE_DATASETS,
    read_fgvc_aircraft,
    read_imagenet,
    read_imagenet_variant,
    read_split_file_dataset,
)
from promptlearn.data.generic_readers import (
    IMAGE_EXTENSIONS,
    read_csv_dataset,
    read_image_folder,
    seeded_split,
)

__all__ = [
    "IMAGENET_VARIANTS",
    "IMAGE_EXTENSIONS",
    "SPLIT_FILE_DATASETS",
    "read_csv_dataset",
    "read_fgvc_aircraft",
    "read_image_folder",
    "read_imagenet",
    "read_imagenet_variant",
    "read_split_file_dataset",
    "seeded_split",
]

"""Facts about the official dataset distributions: file names, published checksums, known quirks.

Everything here is data, shared by the download, ingest and synthetic-data code and by the tests, so that a
file name or an MD5 is written down exactly once.
"""

from __future__ import annotations

# --- ILSVRC-2012 (image-net.org) -------------------------------------------------------------------------------
IMAGENET_TRAIN_TAR = "ILSVRC2012_img_train.tar"
IMAGENET_VAL_TAR = "ILSVRC2012_img_val.tar"
IMAGENET_DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
IMAGENET_FILES = (IMAGENET_TRAIN_TAR, IMAGENET_VAL_TAR, IMAGENET_DEVKIT)

#: Published MD5 checksums of the three official files.
IMAGENET_MD5 = {
    IMAGENET_TRAIN_TAR: "1d675b47d978889d74fa0da5fadfb00e",
    IMAGENET_VAL_TAR: "29b22e2961454d5413ddabcf34fc5622",
    IMAGENET_DEVKIT: "fa75699e90414af021442c21a62c3abf",
}
#: Sizes in bytes, for progress bars and disk-space checks.
IMAGENET_SIZES = {
    IMAGENET_TRAIN_TAR: 147_897_477_120,
    IMAGENET_VAL_TAR: 6_744_924_160,
    IMAGENET_DEVKIT: 2_568_145,
}
IMAGENET_NUM_CLASSES = 1000
IMAGENET_NUM_TRAIN = 1_281_167
IMAGENET_NUM_VAL = 50_000

#: Members of the devkit that the pipeline reads.
DEVKIT_META = "ILSVRC2012_devkit_t12/data/meta.mat"
DEVKIT_VAL_GROUND_TRUTH = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"

#: Validation image names: ILSVRC2012_val_00000001.JPEG ... ILSVRC2012_val_00050000.JPEG
VAL_NAME_FORMAT = "ILSVRC2012_val_{:08d}.JPEG"

# --- Kaggle "ImageNet Object Localization Challenge" layout ----------------------------------------------------
KAGGLE_TRAIN_DIR = "ILSVRC/Data/CLS-LOC/train"
KAGGLE_VAL_DIR = "ILSVRC/Data/CLS-LOC/val"
KAGGLE_SYNSET_MAPPING = "LOC_synset_mapping.txt"
KAGGLE_VAL_SOLUTION = "LOC_val_solution.csv"
KAGGLE_TRAIN_SOLUTION = "LOC_train_solution.csv"

# --- Known quirks of the real ILSVRC-2012 train set ------------------------------------------------------------
#: A PNG file with a .JPEG name.
PNG_DISGUISED_AS_JPEG = "n02105855_2933.JPEG"
#: The 22 CMYK JPEGs of the train set.
CMYK_JPEGS = (
    "n01739381_1309.JPEG",
    "n02077923_14822.JPEG",
    "n02447366_23489.JPEG",
    "n02492035_15739.JPEG",
    "n02747177_10752.JPEG",
    "n03018349_4028.JPEG",
    "n03062245_4620.JPEG",
    "n03347037_9675.JPEG",
    "n03467068_12171.JPEG",
    "n03529860_11437.JPEG",
    "n03544143_17228.JPEG",
    "n03633091_5218.JPEG",
    "n03710637_5125.JPEG",
    "n03961711_5286.JPEG",
    "n04033995_2932.JPEG",
    "n04258138_17003.JPEG",
    "n04264628_27969.JPEG",
    "n04336792_7448.JPEG",
    "n04371774_5854.JPEG",
    "n04596742_4225.JPEG",
    "n07583066_647.JPEG",
    "n13037406_4650.JPEG",
)

#: Image file endings accepted in folder layouts (case-insensitive).
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")

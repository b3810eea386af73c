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

# --- Transfer datasets (Caltech-101, Oxford Flowers-102, PASCAL VOC 2007) --------------------------------------
#: Caltech-101 comes as the original tar.gz or as the newer caltech-101.zip that wraps it (with Annotations.tar).
CALTECH101_TGZ = "101_ObjectCategories.tar.gz"
CALTECH101_ZIP = "caltech-101.zip"
CALTECH101_ZIP_TGZ = "caltech-101/101_ObjectCategories.tar.gz"
CALTECH101_ZIP_ANNOTATIONS = "caltech-101/Annotations.tar"
#: Top folder of the tar: 101_ObjectCategories/<category>/image_%04d.jpg
CALTECH101_ROOT = "101_ObjectCategories"
#: The clutter folder, not a category: excluded from the classes (as in torchvision and the papers).
CALTECH101_BACKGROUND = "BACKGROUND_Google"

FLOWERS102_TGZ = "102flowers.tgz"  # jpg/image_%05d.jpg
FLOWERS102_LABELS = "imagelabels.mat"  # labels: 1 x 8189, 1-based class of image i+1
FLOWERS102_SETID = "setid.mat"  # trnid, valid, tstid: 1-based image numbers
#: setid.mat key of each split
FLOWERS102_SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}
FLOWERS102_NAME_FORMAT = "jpg/image_{:05d}.jpg"

VOC2007_TRAINVAL_TAR = "VOCtrainval_06-Nov-2007.tar"
VOC2007_TEST_TAR = "VOCtest_06-Nov-2007.tar"
VOC2007_ROOT = "VOCdevkit/VOC2007"
#: The 20 classes in the standard (devkit) order, which is also alphabetical.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC2007_SPLITS = ("train", "val", "test")

#: Published MD5 checksums (torchvision's tables and the dataset pages).
TRANSFER_MD5 = {
    CALTECH101_TGZ: "b224c7392d521a49829488ab0f1120d9",
    CALTECH101_ZIP: "3138e1922a9193bfa496528edbbc45d0",
    FLOWERS102_TGZ: "52808999861908f626f3c1f4e79d11fa",
    FLOWERS102_LABELS: "e0620be6f572b9609742df49c70aed4d",
    FLOWERS102_SETID: "a5357ecc9cb78c4bef273ce3793fc85c",
    VOC2007_TRAINVAL_TAR: "c52e279531787c972589f7e41ab4ae64",
    VOC2007_TEST_TAR: "b6e924de25625d8de591ea690078ad9f",
}

#: The files of each dataset: a tuple of groups, each group being alternative packagings of the same data (the
#: first one found at the source is used).
DATASET_FILES = {
    "imagenet": tuple((name,) for name in IMAGENET_FILES),
    "caltech101": ((CALTECH101_TGZ, CALTECH101_ZIP),),
    "flowers102": ((FLOWERS102_TGZ,), (FLOWERS102_LABELS,), (FLOWERS102_SETID,)),
    "voc2007": ((VOC2007_TRAINVAL_TAR,), (VOC2007_TEST_TAR,)),
}

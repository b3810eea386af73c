"""``alexnet download | prepare | stats | synth``: the dataset commands, each calling one library function."""

from __future__ import annotations

import argparse
import json

from alexnet.cli.options import AT_LEAST_1, COUNT, key_value, ranged
from pipelines.rayutil import ADDRESS_HELP


def _download(args: argparse.Namespace) -> int:
    from pipelines.download import download_dataset, parse_headers

    paths = download_dataset(
        args.dataset,
        args.source,
        args.dest,
        verify=args.verify,
        headers=parse_headers(args.header),
        md5=dict(args.md5),
        progress=not args.quiet,
    )
    for path in paths:
        print(path)
    return 0


# --- prepare / stats / synth ------------------------------------------------------------------------------------


def _prepare(args: argparse.Namespace) -> int:
    from pipelines.imaging import ImageRecipe
    from pipelines.prepare import prepare_dataset

    manifest = prepare_dataset(
        args.dataset,
        args.source,
        args.out,
        recipe=ImageRecipe(
            size=args.size, resample=args.resample, draft=args.draft, image_format=args.format, quality=args.quality,
            decoder=args.decoder,
        ),
        layout=getattr(args, "layout", None),
        shard_rows=args.shard_rows,
        max_bad_fraction=args.max_bad_fraction,
        overwrite=args.overwrite,
        seed=args.seed,
        ray_address=args.ray_address,
    )
    summary = {s: {k: v[k] for k in ("rows", "rejected")} | {"shards": len(v["shards"])} for s, v in manifest["splits"].items()}
    print(json.dumps({"out": args.out, "layout": manifest["source"]["layout"], "splits": summary}, indent=2))
    return 0


def _stats(args: argparse.Namespace) -> int:
    from pipelines.stats import compute_stats

    stats = compute_stats(args.data, split=args.split, batch_size=args.batch_size, ray_address=args.ray_address)
    keys = ("mean_rgb", "std_rgb", "eigval", "eigvec", "num_images", "num_pixels")
    print(json.dumps({k: stats[k] for k in keys}, indent=2))
    return 0


#: Options of every `alexnet synth DATASET`; the others are the keyword arguments of the dataset's writer.
_SYNTH_COMMON = ("command", "dataset", "handler", "verbose", "out")


def _synth(args: argparse.Namespace) -> int:
    from pipelines.synth import write_synthetic

    sizes = {k: v for k, v in vars(args).items() if k not in _SYNTH_COMMON}
    info = write_synthetic(args.dataset, args.out, **sizes)
    if args.dataset == "imagenet":
        classes, counts = info.wnids, {"train": len(info.train), "val": len(info.val)}
    else:
        classes, counts = info.classes, {split: len(keys) for split, keys in info.splits.items()}
    print(f"wrote a synthetic {args.dataset} to {args.out}: {len(classes)} classes, "
          + ", ".join(f"{n} {split}" for split, n in counts.items()) + " images")
    return 0


# --- train / evaluate ------------------------------------------------------------------------------------------


def _synth_cifar(args: argparse.Namespace) -> int:
    from pipelines.synth_cifar import write_synthetic_cifar10

    path = write_synthetic_cifar10(args.out, per_batch=args.per_batch, test=args.test, seed=args.seed)
    print(f"wrote a synthetic CIFAR-10 to {path}: {5 * args.per_batch} train, {args.test} test images")
    return 0


def add_commands(commands) -> None:
    """``download``, ``prepare`` and ``stats`` on the top-level subparsers ``commands``."""
    from alexnet.config import RANGES, PrepareConfig  # the prepare options' defaults and ranges, defined once

    # download
    download = commands.add_parser("download", help="fetch official dataset archives, verifying checksums")
    download_sets = download.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    fetched = {
        "imagenet": ("the three ILSVRC-2012 files (train tar, val tar, devkit)",
                     "ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz"),
        "caltech101": ("Caltech-101: 101_ObjectCategories.tar.gz or caltech-101.zip",
                       "101_ObjectCategories.tar.gz, or caltech-101.zip where the source has only that,"),
        "flowers102": ("Oxford Flowers-102: 102flowers.tgz, imagelabels.mat, setid.mat",
                       "102flowers.tgz, imagelabels.mat and setid.mat"),
        "voc2007": ("PASCAL VOC 2007: the trainval and test tars",
                    "VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar"),
    }
    for name, (summary, files) in fetched.items():
        d = download_sets.add_parser(
            name,
            help=summary,
            description=f"Fetch {files} from an https:// URL prefix, s3://bucket/prefix or a local folder into DIR, "
            "resuming partial downloads and verifying the published MD5s.",
        )
        d.add_argument("--from", dest="source", required=True, metavar="URI", help="https://..., s3://... or a folder")
        d.add_argument("--to", dest="dest", required=True, metavar="DIR", help="local destination folder")
        d.add_argument("--no-verify", dest="verify", action="store_false", help="skip MD5 checks (subsets, mirrors)")
        d.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                       help="extra HTTP header, e.g. 'Authorization: Bearer TOKEN' (repeatable)")
        d.add_argument("--md5", action="append", default=[], type=key_value, metavar="FILE=MD5",
                       help="expected MD5 for a file, overriding the published one (repeatable)")
        d.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        d.set_defaults(handler=_download)

    # prepare
    prep = commands.add_parser("prepare", help="preprocess a dataset with Ray Data into Parquet shards")
    prep_sets = prep.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    sources = {
        "imagenet": ("ILSVRC-2012 in the official, Kaggle or ImageFolder layout",
                     "The layout of SRC is auto-detected; archives are read in place."),
        "caltech101": ("Caltech-101 (101_ObjectCategories.tar.gz or caltech-101.zip) -> split all",
                       "Classes are the category folders in sorted order, BACKGROUND_Google excluded; the tar.gz "
                       "is decompressed once into OUT/_cache."),
        "flowers102": ("Oxford Flowers-102 (102flowers.tgz, imagelabels.mat, setid.mat) -> train, val, test",
                       "Labels are the official ones minus 1; the tgz is decompressed once into OUT/_cache."),
        "voc2007": ("PASCAL VOC 2007 (trainval and test tars) -> train, val, test, multi-label",
                    "The tars are read in place; ImageSets/Main/<class>_<split>.txt give the columns labels and "
                    "difficult."),
    }
    for name, (summary, how) in sources.items():
        p = prep_sets.add_parser(
            name,
            help=summary,
            description="Decode, convert to RGB, resize the shorter side to 256, centre-crop 256x256 and write "
            f"Parquet shards plus manifest.json to OUT. {how} Reruns resume; a complete output is left alone "
            "unless --overwrite.",
        )
        p.add_argument("--source", required=True, metavar="SRC", help="folder or s3://bucket/prefix")
        p.add_argument("--out", required=True, metavar="OUT", help="folder or s3://bucket/prefix for the shards")
        if name == "imagenet":
            p.add_argument("--layout", choices=("official", "kaggle", "imagefolder"), help="skip auto-detection")
        p.add_argument("--format", choices=("jpeg", "raw"), default=PrepareConfig.image_format,
                       help=f"stored image encoding (default {PrepareConfig.image_format})")
        p.add_argument("--quality", type=ranged(RANGES["prepare.quality"]), default=PrepareConfig.quality,
                       help=f"JPEG quality of stored images (default {PrepareConfig.quality})")
        p.add_argument("--size", type=AT_LEAST_1, default=256,
                       help="shorter side and crop size (default 256, the paper)")
        p.add_argument("--resample", choices=("bilinear", "bicubic", "lanczos", "box"), default="bilinear",
                       help="resize filter, antialiased (default bilinear)")
        p.add_argument("--no-draft", dest="draft", action="store_false",
                       help="decode large JPEGs at full scale instead of libjpeg's reduced-scale decoding")
        p.add_argument("--decoder", choices=("turbo", "pillow"), default="turbo",
                       help="JPEG decoder: libjpeg-turbo 3 via simplejpeg (default; the same pixels, faster) or "
                       "Pillow's; PNG, CMYK and damaged files always go through Pillow")
        p.add_argument("--shard-rows", type=AT_LEAST_1, default=PrepareConfig.shard_rows or None,
                       help="images per shard (default: about 96 MB per shard)")
        p.add_argument("--max-bad-fraction", type=ranged(RANGES["prepare.max_bad_fraction"], float),
                       default=PrepareConfig.max_bad_fraction,
                       help="fail when more than this fraction of inputs cannot be decoded "
                       f"(default {PrepareConfig.max_bad_fraction})")
        p.add_argument("--overwrite", action="store_true",
                       help="rebuild OUT: delete the files a previous prepare wrote there first (refused when OUT "
                       "holds other files and no prepared dataset)")
        p.add_argument("--seed", type=COUNT, default=0, help="seed of the train-row order across shards")
        p.add_argument("--ray-address", help=ADDRESS_HELP)
        p.set_defaults(handler=_prepare)

    # stats
    s = commands.add_parser(
        "stats",
        help="mean image and RGB PCA of the training split",
        description="One streaming Ray Data pass over the prepared training shards: writes stats.json (mean_rgb, "
        "std_rgb, eigval, eigvec with eigenvectors as columns, pixels in [0, 1]) and mean_image.npy to DATA.",
    )
    s.add_argument("--data", required=True, metavar="URI", help="a prepared dataset (folder or s3://...)")
    s.add_argument("--split", default="train", help="split to use (default train)")
    s.add_argument("--batch-size", type=AT_LEAST_1, default=64, help="images per Ray Data batch")
    s.add_argument("--ray-address", help=ADDRESS_HELP)
    s.set_defaults(handler=_stats)


def add_synth_commands(commands) -> None:
    """``synth imagenet | caltech101 | flowers102 | voc2007 | cifar10``."""
    # synth
    syn = commands.add_parser("synth", help="write small synthetic datasets in the official formats")
    syn_sets = syn.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    y = syn_sets.add_parser(
        "imagenet",
        help="a tiny, learnable ImageNet with the real archive's quirks",
        description="Write a deterministic, learnable ImageNet subset in the official (train tar of class tars, "
        "val tar, devkit with meta.mat), Kaggle or ImageFolder layout, including the quirks of the real set "
        "(a PNG named .JPEG, CMYK and grayscale JPEGs, huge and tiny images, empty and truncated files).",
    )
    y.add_argument("--out", required=True, metavar="DIR")
    y.add_argument("--layout", choices=("official", "kaggle", "imagefolder"), default="official")
    y.add_argument("--classes", type=AT_LEAST_1, default=10)
    y.add_argument("--train-per-class", type=AT_LEAST_1, default=40,
                   help="train images per class (default 40: the 3 bad files stay under the 1%% reject limit)")
    y.add_argument("--val-per-class", type=AT_LEAST_1, default=10)
    y.add_argument("--size", type=AT_LEAST_1, default=320, help="typical longer side of the images")
    y.add_argument("--seed", type=COUNT, default=0)
    y.add_argument("--no-quirks", dest="quirks", action="store_false", help="only clean RGB JPEGs")
    y.set_defaults(handler=_synth)

    per_class = "images per class"
    transfer_synths = {
        "caltech101": (
            "a small, learnable Caltech-101 (101_ObjectCategories.tar.gz and/or caltech-101.zip)",
            "Write a deterministic Caltech-101 with real, mixed-case category names, per-class counts spread over "
            "[--min-per-class, --max-per-class] and a BACKGROUND_Google folder that readers must exclude.",
            [("--classes", dict(type=AT_LEAST_1, default=5)),
             ("--min-per-class", dict(type=AT_LEAST_1, default=35, help=f"fewest {per_class} (default 35)")),
             ("--max-per-class", dict(type=AT_LEAST_1, default=85, help=f"most {per_class} (default 85)")),
             ("--background", dict(type=COUNT, default=10, help="images in BACKGROUND_Google (default 10)")),
             ("--archive", dict(choices=("tar.gz", "zip", "both"), default="tar.gz",
                                help="101_ObjectCategories.tar.gz, caltech-101.zip wrapping it, or both"))],
        ),
        "flowers102": (
            "a small, learnable Flowers-102 (102flowers.tgz, imagelabels.mat, setid.mat)",
            "Write a deterministic Flowers-102 with 1-based labels and trnid/valid/tstid splits in real .mat files.",
            [("--classes", dict(type=AT_LEAST_1, default=5)),
             ("--train-per-class", dict(type=AT_LEAST_1, default=10, help=f"train {per_class} (default 10)")),
             ("--val-per-class", dict(type=AT_LEAST_1, default=10, help=f"val {per_class} (default 10)")),
             ("--test-per-class", dict(type=AT_LEAST_1, default=15, help=f"test {per_class} (default 15)"))],
        ),
        "voc2007": (
            "a small, learnable VOC 2007 (the trainval and test tars)",
            "Write deterministic VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar: 1 to --max-objects "
            "objects of different classes per image, XML annotations with <difficult>, and ImageSets/Main lists for "
            "every class and split (with difficult-only 0 entries).",
            [("--train", dict(type=AT_LEAST_1, default=40, help="train images (default 40)")),
             ("--val", dict(type=AT_LEAST_1, default=40, help="val images (default 40)")),
             ("--test", dict(type=AT_LEAST_1, default=60, help="test images (default 60)")),
             ("--max-objects", dict(type=AT_LEAST_1, default=3, help="most objects per image (default 3)"))],
        ),
    }
    for name, (summary, description, options) in transfer_synths.items():
        y = syn_sets.add_parser(name, help=summary, description=description)
        y.add_argument("--out", required=True, metavar="DIR")
        for flag, spec in options:
            y.add_argument(flag, **spec)
        y.add_argument("--size", type=AT_LEAST_1, default=256, help="typical longer side of the images")
        y.add_argument("--seed", type=COUNT, default=0)
        y.add_argument("--corrupt", type=COUNT, default=0,
                       help="replace this many images by truncated JPEGs (for reject tests; default 0)")
        y.set_defaults(handler=_synth)
    c = syn_sets.add_parser(
        "cifar10",
        help="a tiny, learnable CIFAR-10 (cifar-10-python.tar.gz) for `alexnet figures relu-vs-tanh`",
        description="Write OUT/cifar-10-python.tar.gz in the official python format: cifar-10-batches-py/"
        "data_batch_1..5, test_batch and batches.meta, pickled dicts as the official files hold them.",
    )
    c.add_argument("--out", required=True, metavar="DIR")
    c.add_argument("--per-batch", type=AT_LEAST_1, default=100, help="images per training batch (default 100; real 10000)")
    c.add_argument("--test", type=AT_LEAST_1, default=100, help="test images (default 100; real 10000)")
    c.add_argument("--seed", type=COUNT, default=0)
    c.set_defaults(handler=_synth_cifar)

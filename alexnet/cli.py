"""The ``alexnet`` command: every stage of the pipeline from a terminal.

Each command parses its options and calls exactly one library function, the same one the Prefect flow's task
and the tests call. Run ``alexnet COMMAND --help`` for the options of a command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from pipelines.rayutil import ADDRESS_HELP

Handler = Callable[[argparse.Namespace], int | None]


def _ranged(spec: str, kind: type = int) -> Callable[[str], float]:
    """An argparse ``type``: a number in the interval ``spec`` (``pipelines.ranges``, as for config fields)."""

    def parse(text: str) -> float:
        from pipelines import ranges

        try:
            return ranges.parse("", text, spec, kind)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" message
    return parse


_COUNT, _AT_LEAST_1, _POSITIVE = _ranged("[0, inf)"), _ranged("[1, inf)"), _ranged("(0, inf)", float)


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {text!r}")
    name, value = text.split("=", 1)
    return name, value


# --- download ---------------------------------------------------------------------------------------------------


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


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``alexnet train``, ``alexnet ablate`` and ``python -m alexnet.train`` (one definition)."""
    parser.add_argument("--config", default=None, help="a preset, e.g. configs/paper.yaml or configs/smoke.yaml")
    parser.add_argument("--data", help="prepared dataset URI (sets data.data)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=10 (repeatable)")
    parser.add_argument("--ray-address", help=ADDRESS_HELP)
    parser.add_argument("--no-tracking", dest="tracking", action="store_false", help="do not log to MLflow")


def config_from_args(args: argparse.Namespace):
    """The preset named by ``--config`` with ``--set`` overrides and ``--data`` applied."""
    from alexnet.config import load_config

    overrides = list(args.overrides) + ([f"data.data={args.data}"] if args.data else [])
    return load_config(args.config, overrides)


def _train(args: argparse.Namespace) -> int:
    from alexnet.train import run_training

    result = run_training(config_from_args(args), ray_address=args.ray_address, tracking=args.tracking)
    print(json.dumps({"checkpoint": result.checkpoint, "mlflow_run_id": result.mlflow_run_id,
                      "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}, indent=2))
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    """``python -m alexnet.train`` (the entry point of ``ray job submit``): ``alexnet train``'s options."""
    from alexnet import train
    from pipelines.redact import redact_handlers

    parser = argparse.ArgumentParser(prog="python -m alexnet.train", description=train.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_handlers()  # no credential of a URI in a log line
    return _train(args)


def _evaluate(args: argparse.Namespace) -> int:
    from alexnet.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.data, crops=args.crops, split=args.split,
                                 batch_size=args.batch_size, limit=args.limit, device=args.device)
    print(f"{result['split']}: top-1 error {result['top1_err']:.4f}, top-5 error {result['top5_err']:.4f} "
          f"({result['crops']} crop{'s' if result['crops'] > 1 else ''}, {result['images']} images; "
          f"paper, 1 CNN, 10 crops: {result['paper']['top1_err']:.3f} / {result['paper']['top5_err']:.3f})")
    if args.tracking:
        from alexnet.evaluate import log_evaluation

        result["logged_to_mlflow_run"] = log_evaluation(result)
    # the per-class table (a row per class: 1000 on ImageNet) is in MLflow, not on the terminal
    print(json.dumps({k: v for k, v in result.items() if k != "per_class"}, indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from alexnet.predict import format_table, load_predictor, predict, read_file_list

    paths = list(args.images) + (read_file_list(args.files) if args.files else [])
    if not paths:
        raise ValueError("no images: pass IMAGE paths or --files LIST")
    predictor = load_predictor(args.checkpoint, data=args.data, tracking_uri=args.tracking_uri)
    result = predict(predictor, paths, crops=args.crops, topk=args.topk, batch_size=args.batch_size,
                     device=args.device)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _register(args: argparse.Namespace) -> int:
    from alexnet.registry import evaluation_of_run, promote_model
    from alexnet.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    evaluation = evaluation_of_run(uri, args.run_id, crops=args.crops)
    result = promote_model(uri, args.name, args.run_id, args.alias, evaluation, dict(args.tag))
    moved = f"@{result['alias']} now points at it" if result["alias"] else f"@{args.alias} stays ({result['alias_reason']})"
    print(f"{result['name']} version {result['version']}: top-1 error {result['top1_err']:.4f}; {moved}")
    print(json.dumps(result, indent=2))
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from alexnet.ablate import run_ablations
    from alexnet.results import markdown

    result = run_ablations(config_from_args(args), only=args.only or None, ten_crop=args.ten_crop,
                           max_concurrent=args.max_concurrent, ray_address=args.ray_address, tracking=args.tracking)
    print(markdown(result.table))
    print(json.dumps({"mlflow_run_id": result.mlflow_run_id,
                      "checkpoints": {n: t.get("checkpoint") for n, t in result.trials.items()}}, indent=2))
    return 0


def _transfer(args: argparse.Namespace) -> int:
    from alexnet.config import load_config
    from alexnet.results import markdown, transfer_table
    from alexnet.transfer import run_transfer, summarize

    cfg = load_config(args.config, list(args.overrides))
    result = run_transfer(args.dataset, args.data, args.checkpoint, method=args.method, config=cfg.transfer,
                          imagenet_stats=args.imagenet_stats, ray_address=args.ray_address, tracking=args.tracking,
                          tracking_uri=args.tracking_uri or cfg.tracking.tracking_uri or None,
                          experiment=args.experiment or cfg.tracking.experiment)
    print(markdown(transfer_table([result])))
    print(json.dumps(summarize(result), indent=2, default=str))
    return 0


def add_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``alexnet transfer``."""
    from alexnet.config import TRANSFER_DATASETS, TRANSFER_METHODS

    parser.add_argument("dataset", choices=TRANSFER_DATASETS)
    parser.add_argument("--data", required=True, help="the prepared dataset (`alexnet prepare DATASET ...`)")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint of `alexnet train` (folder or checkpoint.pt) or torchvision AlexNet weights")
    parser.add_argument("--method", choices=TRANSFER_METHODS, default="probe")
    parser.add_argument("--config", default=None, help="a preset whose `transfer:` section to use")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="transfer.KEY=VALUE",
                        help="override a transfer setting, e.g. --set transfer.epochs=10 (repeatable)")
    parser.add_argument("--imagenet-stats", default=None,
                        help="prepared ImageNet holding the stats.json/mean_image.npy the checkpoint was trained with "
                             "(default: the dataset in the checkpoint's config)")
    parser.add_argument("--ray-address", help=ADDRESS_HELP)
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or sqlite)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: the preset's)")
    parser.add_argument("--no-tracking", dest="tracking", action="store_false", help="do not log to MLflow")


def _figures(args: argparse.Namespace) -> int:
    tracking = dict(tracking=args.tracking, tracking_uri=args.tracking_uri, experiment=args.experiment)
    if args.figure == "relu-vs-tanh":
        from alexnet.figures import make_relu_vs_tanh

        result = make_relu_vs_tanh(args.data, args.out, lr_relu=args.lr_relu, lr_tanh=args.lr_tanh,
                                   target=args.target, max_epochs=args.max_epochs, batch_size=args.batch_size,
                                   seed=args.seed, device=args.device, **tracking)
        reached = result["epochs_to_target"]
        ratio = f"{result['ratio']:.2f}" if result["ratio"] else "unknown (a network did not reach it)"
        print(f"{result['target']:.0%} training error: ReLU at epoch {reached['relu']}, tanh at epoch "
              f"{reached['tanh']}; ratio {ratio} (paper: about 6)")
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
        return 0
    if not (args.checkpoint and args.data):
        raise ValueError("pass --checkpoint URI and --data URI (or `alexnet figures relu-vs-tanh --data CIFAR`)")
    from alexnet.figures import make_figures

    summary = make_figures(args.checkpoint, args.data, args.out, queries=args.queries, neighbours=args.neighbours,
                           seed=args.seed, batch_size=args.batch_size, use_gpu=args.use_gpu,
                           num_actors=args.feature_actors, ray_address=args.ray_address, **tracking)
    for path in summary["files"].values():
        print(path)
    print(json.dumps({k: v for k, v in summary.items() if k != "queries"}, indent=2))
    return 0


def _synth_cifar(args: argparse.Namespace) -> int:
    from pipelines.synth_cifar import write_synthetic_cifar10

    path = write_synthetic_cifar10(args.out, per_batch=args.per_batch, test=args.test, seed=args.seed)
    print(f"wrote a synthetic CIFAR-10 to {path}: {5 * args.per_batch} train, {args.test} test images")
    return 0


def _add_tracking_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-tracking", dest="tracking", action="store_false", help="do not log to MLflow")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="alexnet", help="MLflow experiment (default alexnet)")


# --- the parser -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alexnet",
        description="Reproduce AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012): download, prepare, stats, ...",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
        d.add_argument("--md5", action="append", default=[], type=_key_value, metavar="FILE=MD5",
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
        p.add_argument("--quality", type=_ranged(RANGES["prepare.quality"]), default=PrepareConfig.quality,
                       help=f"JPEG quality of stored images (default {PrepareConfig.quality})")
        p.add_argument("--size", type=_AT_LEAST_1, default=256,
                       help="shorter side and crop size (default 256, the paper)")
        p.add_argument("--resample", choices=("bilinear", "bicubic", "lanczos", "box"), default="bilinear",
                       help="resize filter, antialiased (default bilinear)")
        p.add_argument("--no-draft", dest="draft", action="store_false",
                       help="decode large JPEGs at full scale instead of libjpeg's reduced-scale decoding")
        p.add_argument("--decoder", choices=("turbo", "pillow"), default="turbo",
                       help="JPEG decoder: libjpeg-turbo 3 via simplejpeg (default; the same pixels, faster) or "
                       "Pillow's; PNG, CMYK and damaged files always go through Pillow")
        p.add_argument("--shard-rows", type=_AT_LEAST_1, default=PrepareConfig.shard_rows or None,
                       help="images per shard (default: about 96 MB per shard)")
        p.add_argument("--max-bad-fraction", type=_ranged(RANGES["prepare.max_bad_fraction"], float),
                       default=PrepareConfig.max_bad_fraction,
                       help="fail when more than this fraction of inputs cannot be decoded "
                       f"(default {PrepareConfig.max_bad_fraction})")
        p.add_argument("--overwrite", action="store_true",
                       help="rebuild OUT: delete the files a previous prepare wrote there first (refused when OUT "
                       "holds other files and no prepared dataset)")
        p.add_argument("--seed", type=_COUNT, default=0, help="seed of the train-row order across shards")
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
    s.add_argument("--batch-size", type=_AT_LEAST_1, default=64, help="images per Ray Data batch")
    s.add_argument("--ray-address", help=ADDRESS_HELP)
    s.set_defaults(handler=_stats)

    # train
    t = commands.add_parser(
        "train",
        help="train AlexNet with Ray Train (the paper's recipe)",
        description="Train on a prepared dataset with Ray Train, from a preset in configs/ plus --set overrides. "
        "Rerunning the same train.run_name resumes from its latest checkpoint. Same as `python -m alexnet.train`.",
    )
    add_train_arguments(t)
    t.set_defaults(handler=_train)

    # evaluate
    e = commands.add_parser(
        "evaluate",
        help="top-1/top-5 error of a checkpoint (centre crop or 10 crops)",
        description="Evaluate a checkpoint folder (or its checkpoint.pt) on a prepared split; --crops 10 averages "
        "the softmax of the four corner and centre patches and their reflections (the paper's test protocol).",
    )
    e.add_argument("--checkpoint", required=True, metavar="URI")
    e.add_argument("--data", required=True, metavar="URI", help="prepared dataset with stats.json")
    e.add_argument("--crops", type=int, choices=(1, 10), default=1)
    e.add_argument("--split", default="val")
    e.add_argument("--batch-size", type=_AT_LEAST_1, default=128)
    e.add_argument("--limit", type=_AT_LEAST_1, help="evaluate only this many images")
    e.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    e.add_argument("--no-tracking", dest="tracking", action="store_false",
                   help="do not log to MLflow (default: log into the checkpoint's training run, MLFLOW_TRACKING_URI "
                   "or sqlite:///mlflow.db)")
    e.set_defaults(handler=_evaluate)

    # predict
    pr = commands.add_parser(
        "predict",
        help="top-5 class words and probabilities of image files (centre crop or 10 crops)",
        description="Classify JPEG/PNG files with a checkpoint of `alexnet train` (folder or checkpoint.pt, local "
        "or s3://), a registered model (models:/NAME@ALIAS or models:/NAME/VERSION: the checkpoint of the training "
        "run that registered it) or a torchvision AlexNet state dict. Images get the evaluation's preprocessing "
        "(the prepared dataset's recipe: shorter side 256, centre 256 crop; then the centre 224 crop or the ten "
        "crops, normalised as the checkpoint was trained).",
    )
    pr.add_argument("images", nargs="*", metavar="IMAGE", help="image files (local or s3://)")
    pr.add_argument("--checkpoint", required=True, metavar="URI",
                    help="checkpoint folder/file, models:/alexnet@champion, or a torchvision state dict (.pth)")
    pr.add_argument("--files", metavar="LIST", help="a text file of image paths, one per line (# comments)")
    pr.add_argument("--data", metavar="URI",
                    help="the prepared dataset the checkpoint was trained on: stats, recipe, class words "
                    "(default: the one in its config)")
    pr.add_argument("--crops", type=int, choices=(1, 10), default=1)
    pr.add_argument("--topk", type=_AT_LEAST_1, default=5, help="classes per image (default 5)")
    pr.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pr.add_argument("--batch-size", type=_AT_LEAST_1, default=32)
    pr.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    pr.add_argument("--tracking-uri", help="MLflow store of models:/ URIs (default: MLFLOW_TRACKING_URI, else "
                    "sqlite:///mlflow.db)")
    pr.set_defaults(handler=_predict)

    # register
    r = commands.add_parser(
        "register",
        help="tag a training run's registered model version with its evaluation; move an alias to it if better",
        description="The flow's register stage (alexnet.registry.promote_model): the version of --name that the "
        "training run --run-id logged (tracking.log_model, tracking.registered_model) is tagged with the evaluation "
        "`alexnet evaluate` logged into that run, and --alias moves to it unless the current holder, evaluated on "
        "the same data, has a lower top-1 error.",
    )
    r.add_argument("--run-id", required=True, help="the MLflow training run (`alexnet train` prints it)")
    r.add_argument("--name", required=True, help="the registered model (tracking.registered_model)")
    r.add_argument("--alias", default="champion")
    r.add_argument("--crops", type=int, choices=(1, 10), default=10, help="the evaluation to compare (default 10)")
    r.add_argument("--tag", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="another tag for the model version (repeatable)")
    r.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or sqlite)")
    r.set_defaults(handler=_register)

    # ablate
    from alexnet.ablate import TRAINED as ABLATIONS

    ab = commands.add_parser(
        "ablate",
        help="the paper's ablations: each its own Ray Train run on Ray Tune, the table beside the paper's deltas",
        description="Train the paper net and each ablation (no LRN, 2/2 pooling, the one-GPU half-kernel net, no "
        "PCA lighting, no dropout) as Ray Tune trials, each a Ray Train run of the preset with that switch; "
        "evaluate the paper net with 1 and 10 crops; print the table of error changes beside the paper's "
        "(LRN -1.4/-1.2, overlap -0.4/-0.3, two GPUs -1.7/-1.2, lighting about -1, 10 crops) and log it to "
        "MLflow (a parent run, a child per ablation). Reruns resume each trial's training.",
    )
    add_train_arguments(ab)
    ab.add_argument("--only", type=lambda text: [n for n in text.split(",") if n], default=[],
                    metavar="NAME[,NAME...]", help=f"a subset of {', '.join(ABLATIONS[1:])} (the paper net always runs)")
    ab.add_argument("--no-ten-crop", dest="ten_crop", action="store_false", help="skip the 1 vs 10 crops row")
    ab.add_argument("--max-concurrent", type=int, default=0,
                    help="trials at once (default: as many as the cluster has room for their Ray Train workers)")
    ab.set_defaults(handler=_ablate)

    # transfer
    tr = commands.add_parser(
        "transfer",
        help="transfer learning: linear probe or fine-tuning on Caltech-101, Flowers-102, VOC 2007",
        description="Evaluate an ImageNet checkpoint on a prepared transfer dataset with its standard protocol "
        "(Caltech-101: 30 train / at most 50 test per class, 5 splits, mean per-class accuracy; Flowers-102: "
        "trnid/valid/tstid, mean per-class accuracy; VOC 2007: trainval/test, 11-point mAP) by a linear probe on "
        "fc7/fc6 features (Ray Data actors) or by fine-tuning (Ray Train). Settings: the `transfer:` section of "
        "--config plus --set transfer.KEY=VALUE. Logs an MLflow run with the results beside the literature.",
    )
    add_transfer_arguments(tr)
    tr.set_defaults(handler=_transfer)

    # figures
    fig = commands.add_parser(
        "figures",
        help="the paper's figures (3: conv1 kernels, 4: top-5 and nearest neighbours, curves; 1: ReLU vs tanh)",
        description="Write the paper's Figure 3 (conv1's kernels), Figure 4 (validation images with their top-5 "
        "labels and six nearest training images in fc7 space, features from Ray Data actors) and the training "
        "curves of a checkpoint as PNGs into --out, and log them to an MLflow run figures-<checkpoint>. "
        "`alexnet figures relu-vs-tanh --data CIFAR` draws Figure 1 instead.",
    )
    fig.add_argument("--checkpoint", metavar="URI", help="a checkpoint of `alexnet train` (folder or checkpoint.pt)")
    fig.add_argument("--data", metavar="URI", help="the prepared ImageNet it was trained on (with stats.json)")
    fig.add_argument("--out", default="figures", metavar="DIR", help="folder for the PNGs (default figures)")
    fig.add_argument("--queries", type=_AT_LEAST_1, default=5, help="validation images in Figure 4 (default 5)")
    fig.add_argument("--neighbours", type=_AT_LEAST_1, default=6, help="nearest training images per query (default 6)")
    fig.add_argument("--seed", type=_COUNT, default=0, help="seed of the choice of validation images")
    fig.add_argument("--batch-size", type=_AT_LEAST_1, default=128, help="images per feature-extraction batch")
    fig.add_argument("--use-gpu", action="store_true", help="one GPU per feature-extraction actor")
    fig.add_argument("--feature-actors", type=_COUNT, default=0, help="feature-extraction actors (default: per CPU/GPU)")
    fig.add_argument("--ray-address", help=ADDRESS_HELP)
    _add_tracking_options(fig)
    fig.set_defaults(handler=_figures, figure="checkpoint")
    fig_sets = fig.add_subparsers(dest="figure", metavar="FIGURE")
    rt = fig_sets.add_parser(
        "relu-vs-tanh",
        help="Figure 1: the four-layer CIFAR-10 network with ReLUs and with tanh, to 25%% training error",
        description="Train the paper's four-layer CIFAR-10 network (alexnet/cifar.py) with ReLUs and with tanh "
        "units until an epoch's training error is at most --target, plot both curves to --out/relu_vs_tanh.png, "
        "print the epoch each reached it and their ratio (the paper: about 6), and log an MLflow run.",
    )
    rt.add_argument("--data", required=True, metavar="PATH",
                    help="cifar-10-python.tar.gz (the official python version) or its cifar-10-batches-py folder")
    rt.add_argument("--out", default="figures", metavar="DIR", help="folder for the PNG (default figures)")
    rt.add_argument("--lr-relu", type=_POSITIVE, default=0.001, help="learning rate of the ReLU network (default 0.001)")
    rt.add_argument("--lr-tanh", type=_POSITIVE, default=0.001, help="learning rate of the tanh network (default 0.001)")
    rt.add_argument("--target", type=_ranged("(0, 1]", float), default=0.25, help="training error to reach (default 0.25)")
    rt.add_argument("--max-epochs", type=_AT_LEAST_1, default=100, help="stop a network here if it has not (default 100)")
    rt.add_argument("--batch-size", type=_AT_LEAST_1, default=128)
    rt.add_argument("--seed", type=_COUNT, default=0)
    rt.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    _add_tracking_options(rt)
    rt.set_defaults(handler=_figures)

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
    y.add_argument("--classes", type=_AT_LEAST_1, default=10)
    y.add_argument("--train-per-class", type=_AT_LEAST_1, default=40,
                   help="train images per class (default 40: the 3 bad files stay under the 1%% reject limit)")
    y.add_argument("--val-per-class", type=_AT_LEAST_1, default=10)
    y.add_argument("--size", type=_AT_LEAST_1, default=320, help="typical longer side of the images")
    y.add_argument("--seed", type=_COUNT, default=0)
    y.add_argument("--no-quirks", dest="quirks", action="store_false", help="only clean RGB JPEGs")
    y.set_defaults(handler=_synth)

    per_class = "images per class"
    transfer_synths = {
        "caltech101": (
            "a small, learnable Caltech-101 (101_ObjectCategories.tar.gz and/or caltech-101.zip)",
            "Write a deterministic Caltech-101 with real, mixed-case category names, per-class counts spread over "
            "[--min-per-class, --max-per-class] and a BACKGROUND_Google folder that readers must exclude.",
            [("--classes", dict(type=_AT_LEAST_1, default=5)),
             ("--min-per-class", dict(type=_AT_LEAST_1, default=35, help=f"fewest {per_class} (default 35)")),
             ("--max-per-class", dict(type=_AT_LEAST_1, default=85, help=f"most {per_class} (default 85)")),
             ("--background", dict(type=_COUNT, default=10, help="images in BACKGROUND_Google (default 10)")),
             ("--archive", dict(choices=("tar.gz", "zip", "both"), default="tar.gz",
                                help="101_ObjectCategories.tar.gz, caltech-101.zip wrapping it, or both"))],
        ),
        "flowers102": (
            "a small, learnable Flowers-102 (102flowers.tgz, imagelabels.mat, setid.mat)",
            "Write a deterministic Flowers-102 with 1-based labels and trnid/valid/tstid splits in real .mat files.",
            [("--classes", dict(type=_AT_LEAST_1, default=5)),
             ("--train-per-class", dict(type=_AT_LEAST_1, default=10, help=f"train {per_class} (default 10)")),
             ("--val-per-class", dict(type=_AT_LEAST_1, default=10, help=f"val {per_class} (default 10)")),
             ("--test-per-class", dict(type=_AT_LEAST_1, default=15, help=f"test {per_class} (default 15)"))],
        ),
        "voc2007": (
            "a small, learnable VOC 2007 (the trainval and test tars)",
            "Write deterministic VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar: 1 to --max-objects "
            "objects of different classes per image, XML annotations with <difficult>, and ImageSets/Main lists for "
            "every class and split (with difficult-only 0 entries).",
            [("--train", dict(type=_AT_LEAST_1, default=40, help="train images (default 40)")),
             ("--val", dict(type=_AT_LEAST_1, default=40, help="val images (default 40)")),
             ("--test", dict(type=_AT_LEAST_1, default=60, help="test images (default 60)")),
             ("--max-objects", dict(type=_AT_LEAST_1, default=3, help="most objects per image (default 3)"))],
        ),
    }
    for name, (summary, description, options) in transfer_synths.items():
        y = syn_sets.add_parser(name, help=summary, description=description)
        y.add_argument("--out", required=True, metavar="DIR")
        for flag, spec in options:
            y.add_argument(flag, **spec)
        y.add_argument("--size", type=_AT_LEAST_1, default=256, help="typical longer side of the images")
        y.add_argument("--seed", type=_COUNT, default=0)
        y.add_argument("--corrupt", type=_COUNT, default=0,
                       help="replace this many images by truncated JPEGs (for reject tests; default 0)")
        y.set_defaults(handler=_synth)
    c = syn_sets.add_parser(
        "cifar10",
        help="a tiny, learnable CIFAR-10 (cifar-10-python.tar.gz) for `alexnet figures relu-vs-tanh`",
        description="Write OUT/cifar-10-python.tar.gz in the official python format: cifar-10-batches-py/"
        "data_batch_1..5, test_batch and batches.meta, pickled dicts as the official files hold them.",
    )
    c.add_argument("--out", required=True, metavar="DIR")
    c.add_argument("--per-batch", type=_AT_LEAST_1, default=100, help="images per training batch (default 100; real 10000)")
    c.add_argument("--test", type=_AT_LEAST_1, default=100, help="test images (default 100; real 10000)")
    c.add_argument("--seed", type=_COUNT, default=0)
    c.set_defaults(handler=_synth_cifar)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from pipelines.redact import redact_handlers, redact_text

    redact_handlers()  # no credential of a URI in a log line, ours or a library's
    handler: Handler = args.handler
    try:
        return handler(args) or 0
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as e:
        # Expected failures (bad input, checksum, incomplete data) end with their message, not a traceback.
        logging.getLogger("alexnet").debug("failed", exc_info=True)
        print(f"alexnet {args.command}: error: {redact_text(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

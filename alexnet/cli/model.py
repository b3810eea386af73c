"""``alexnet train | evaluate | predict | register | ablate | transfer | figures``, and ``python -m alexnet.train``."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence

from alexnet.cli.options import AT_LEAST_1, COUNT, POSITIVE, add_tracking_options, key_value, ranged
from pipelines.rayutil import ADDRESS_HELP


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


def add_commands(commands) -> None:
    """``train``, ``evaluate``, ``predict``, ``register``, ``ablate``, ``transfer`` and ``figures``."""
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
    e.add_argument("--batch-size", type=AT_LEAST_1, default=128)
    e.add_argument("--limit", type=AT_LEAST_1, help="evaluate only this many images")
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
    pr.add_argument("--topk", type=AT_LEAST_1, default=5, help="classes per image (default 5)")
    pr.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pr.add_argument("--batch-size", type=AT_LEAST_1, default=32)
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
    r.add_argument("--tag", type=key_value, action="append", default=[], metavar="KEY=VALUE",
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
    fig.add_argument("--queries", type=AT_LEAST_1, default=5, help="validation images in Figure 4 (default 5)")
    fig.add_argument("--neighbours", type=AT_LEAST_1, default=6, help="nearest training images per query (default 6)")
    fig.add_argument("--seed", type=COUNT, default=0, help="seed of the choice of validation images")
    fig.add_argument("--batch-size", type=AT_LEAST_1, default=128, help="images per feature-extraction batch")
    fig.add_argument("--use-gpu", action="store_true", help="one GPU per feature-extraction actor")
    fig.add_argument("--feature-actors", type=COUNT, default=0, help="feature-extraction actors (default: per CPU/GPU)")
    fig.add_argument("--ray-address", help=ADDRESS_HELP)
    add_tracking_options(fig)
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
    rt.add_argument("--lr-relu", type=POSITIVE, default=0.001, help="learning rate of the ReLU network (default 0.001)")
    rt.add_argument("--lr-tanh", type=POSITIVE, default=0.001, help="learning rate of the tanh network (default 0.001)")
    rt.add_argument("--target", type=ranged("(0, 1]", float), default=0.25, help="training error to reach (default 0.25)")
    rt.add_argument("--max-epochs", type=AT_LEAST_1, default=100, help="stop a network here if it has not (default 100)")
    rt.add_argument("--batch-size", type=AT_LEAST_1, default=128)
    rt.add_argument("--seed", type=COUNT, default=0)
    rt.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    add_tracking_options(rt)
    rt.set_defaults(handler=_figures)

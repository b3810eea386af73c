"""The paper's figures (``alexnet.figures``), the CIFAR-10 reader and network (``alexnet.cifar``) and the synthetic
CIFAR-10 tarball (``pipelines.synth_cifar``)."""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def assert_png_shows_something(path: Path, *, min_size: tuple[int, int]) -> None:
    """A PNG a person can open: at least ``min_size`` pixels, not blank (spread of values, many colours)."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1], img.size
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 20, pixels.std()
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def _store(tmp_path: Path) -> str:
    """An MLflow store whose experiment ``figures-test`` keeps its artifacts under ``tmp_path`` (not ./mlruns)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("figures-test", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri


# --- Figure 3 ------------------------------------------------------------------------------------------------------


def test_kernel_grid_scales_each_kernel_to_0_1_in_kernel_order(tmp_path):
    from alexnet.figures import kernel_grid, plot_conv1_kernels

    base = torch.linspace(-1, 1, 3 * 11 * 11).reshape(3, 11, 11)
    weight = torch.stack([base * (i + 1) * 1e-3 + 0.01 * i for i in range(96)])  # different scales and offsets
    scale, gap = 2, 1
    grid = kernel_grid(weight, columns=12, scale=scale, gap=gap)
    cell = 11 * scale + gap
    assert grid.shape == (8 * cell + gap, 12 * cell + gap, 3)
    for i in (0, 47, 48, 95):  # kernel i at row i // 12: 0-47 in the top four rows, 48-95 below
        r, c = divmod(i, 12)
        patch = grid[gap + r * cell:gap + r * cell + 11 * scale, gap + c * cell:gap + c * cell + 11 * scale]
        assert patch.min() == pytest.approx(0.0) and patch.max() == pytest.approx(1.0)
        expected = ((base - base.min()) / (base.max() - base.min())).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(patch[::scale, ::scale], expected, atol=1e-4)
    torch.manual_seed(0)
    conv1 = torch.nn.Sequential(torch.nn.Conv2d(3, 96, 11, stride=4, padding=2))  # the paper's conv1
    path = plot_conv1_kernels(conv1, tmp_path / "conv1.png", towers=2)
    assert_png_shows_something(path, min_size=(600, 450))


# --- training curves -----------------------------------------------------------------------------------------------


def _history(epochs: int = 10) -> list[dict]:
    return [{"epoch": e, "lr": 0.01 * 0.1 ** ((e > 5) + (e > 8)), "train_loss": 2.0 / e, "train_top1_err": 0.9 - 0.08 * e,
             "val_top1_err": 0.92 - 0.07 * e, "val_top5_err": 0.6 - 0.05 * e} for e in range(1, epochs + 1)]


def test_training_curves_mark_the_learning_rate_drops(tmp_path):
    from alexnet.figures import lr_drops, plot_training_curves

    history = _history()
    assert lr_drops(history) == [(6, pytest.approx(0.001)), (9, pytest.approx(0.0001))]
    assert lr_drops(history[:5]) == []
    assert_png_shows_something(plot_training_curves(history, tmp_path / "curves.png"), min_size=(600, 400))
    with pytest.raises(ValueError, match="no training history"):
        plot_training_curves([], tmp_path / "none.png")


# --- Figure 4's search ---------------------------------------------------------------------------------------------


def test_streaming_top6_equals_a_full_search_in_any_batch_order():
    from alexnet.figures import NearestNeighbours

    rng = np.random.default_rng(0)
    queries = rng.normal(size=(5, 64)).astype(np.float32)
    features = rng.normal(size=(1000, 64)).astype(np.float32)
    features[10] = features[11]  # an exact tie, broken by key
    keys = np.array([f"k{i:04d}" for i in range(1000)], dtype=object)
    full = np.linalg.norm(queries[:, None, :].astype(np.float64) - features[None], axis=2)
    expected = np.array([np.lexsort((keys, d))[:6] for d in full])
    for seed in (1, 2):
        order = np.random.default_rng(seed).permutation(1000)
        nearest = NearestNeighbours(queries, k=6)
        for chunk in np.array_split(order, 7):
            nearest.update(keys[chunk], features[chunk])
        assert nearest.keys.shape == (5, 6)
        assert (nearest.keys == keys[expected]).all()
        np.testing.assert_allclose(nearest.distances, np.take_along_axis(full, expected, 1), rtol=1e-6)


# --- CIFAR-10 and Figure 1 -----------------------------------------------------------------------------------------


def test_synthetic_cifar_has_the_official_layout_and_globals(tmp_path):
    from alexnet.cifar import load_cifar10
    from pipelines.synth_cifar import write_synthetic_cifar10

    path = write_synthetic_cifar10(tmp_path, per_batch=20, test=30)
    assert path.name == "cifar-10-python.tar.gz" and path.read_bytes() == write_synthetic_cifar10(
        tmp_path / "again", per_batch=20, test=30).read_bytes()
    with tarfile.open(path) as tar:
        names = sorted(tar.getnames())
        batch = tar.extractfile("cifar-10-batches-py/data_batch_1").read()
    assert names == ["cifar-10-batches-py"] + [f"cifar-10-batches-py/{n}" for n in (
        "batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
        "readme.html", "test_batch")]
    globals_ = [arg for op, arg, _ in pickletools.genops(batch) if "GLOBAL" in op.name]
    assert globals_ == ["numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"]
    cifar = load_cifar10(path)
    assert cifar.train_images.shape == (100, 3, 32, 32) and cifar.train_images.dtype == np.uint8
    assert cifar.test_images.shape == (30, 3, 32, 32) and sorted(set(cifar.train_labels.tolist())) == list(range(10))
    assert cifar.label_names[:2] == ["airplane", "automobile"]
    # the extracted folder reads the same
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    assert (load_cifar10(tmp_path / "x").train_images == cifar.train_images).all()


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.target}",))


def test_cifar_reader_runs_no_code_from_a_pickle(tmp_path):
    from alexnet.cifar import load_batch, load_cifar10
    from pipelines.synth_cifar import write_synthetic_cifar10

    evil = _RunsCode()
    evil.target = tmp_path / "pwned"
    payload = pickle.dumps({b"data": evil, b"labels": [0]}, protocol=3)
    with pytest.raises(ValueError, match="refused global (posix|nt).system"):
        load_batch(io.BytesIO(payload), "evil")
    assert not evil.target.exists()
    # a tampered tarball fails with the member's name
    good = write_synthetic_cifar10(tmp_path / "good", per_batch=10, test=10)
    bad = tmp_path / "bad" / "cifar-10-python.tar.gz"
    bad.parent.mkdir()
    with tarfile.open(good) as src, tarfile.open(bad, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("data_batch_3"):
                data, member.size = payload, len(payload)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    with pytest.raises(ValueError, match="data_batch_3: not a CIFAR-10 python batch"):
        load_cifar10(bad)
    assert not evil.target.exists()


def test_cifar_net_is_the_four_layer_network_with_either_activation():
    from alexnet.cifar import CifarNet

    for activation in ("relu", "tanh"):
        net = CifarNet(activation)
        layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        assert len(layers) == 4 and [m.weight.shape[0] for m in layers] == [32, 32, 64, 10]
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="activation"):
        CifarNet("sigmoid")


@pytest.mark.slow
def test_relu_vs_tanh_cli_trains_both_to_the_target_and_logs_figure_1(tmp_path, capsys):
    import mlflow

    from alexnet.cli import main

    assert main(["synth", "cifar10", "--out", str(tmp_path / "cifar"), "--per-batch", "20", "--test", "10"]) == 0
    tracking = _store(tmp_path)
    argv = ["figures", "relu-vs-tanh", "--data", str(tmp_path / "cifar" / "cifar-10-python.tar.gz"), "--out",
            str(tmp_path / "figs"), "--lr-relu", "0.001", "--lr-tanh", "0.001", "--target", "0.3",
            "--max-epochs", "8", "--batch-size", "10", "--device", "cpu", "--tracking-uri", tracking,
            "--experiment", "figures-test"]
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    reached = summary["epochs_to_target"]
    assert reached["relu"] and reached["tanh"], summary  # both learn the synthetic classes within 8 epochs
    assert f"ReLU at epoch {reached['relu']}, tanh at epoch {reached['tanh']}" in out
    assert summary["ratio"] == pytest.approx(reached["tanh"] / reached["relu"]) and summary["train_images"] == 100
    assert_png_shows_something(Path(summary["file"]), min_size=(600, 400))
    client = mlflow.MlflowClient(tracking)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.run_name == "figures-relu-vs-tanh" and run.data.params["lr_tanh"] == "0.001"
    relu = client.get_metric_history(run.info.run_id, "train_error_relu")
    assert len(relu) == reached["relu"] and relu[-1].value <= 0.3
    assert [a.path for a in client.list_artifacts(run.info.run_id, "figures")] == ["figures/relu_vs_tanh.png"]


# --- the whole command on the synthetic ImageNet -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_checkpoint(train_data, tmp_path_factory) -> str:
    """A freshly initialised smoke-preset network saved as `alexnet train` saves it, with a 10-epoch history."""
    from alexnet.config import load_config
    from alexnet.model import build_model
    from alexnet.train import CHECKPOINT_FILE, LRSchedule, build_optimizer, checkpoint_state

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"data.data={train_data}"])
    torch.manual_seed(0)
    m = cfg.model
    model = build_model(variant=m.variant, num_classes=10, lrn=m.lrn, overlap_pool=m.overlap_pool, groups=m.groups,
                        dropout=m.dropout, init=m.init)
    optimizer = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
    state = checkpoint_state(model=model, optimizer=optimizer, schedule=LRSchedule(0.01), epoch=10,
                             config=cfg.to_dict(), num_classes=10, manifest_sha256=None, stats_sha256=None,
                             history=_history(), mlflow_run_id=None)
    folder = tmp_path_factory.mktemp("figures-ckpt") / "checkpoint_000010"
    folder.mkdir()
    torch.save(state, folder / CHECKPOINT_FILE)
    return str(folder)


@pytest.mark.slow
def test_figures_cli_writes_and_logs_figures_3_4_and_the_curves(fresh_checkpoint, train_data, ray_local, tmp_path,
                                                                capsys):
    import mlflow

    from alexnet.cli import main
    from alexnet.figures import stored_images
    from alexnet.transfer import load_backbone
    from pipelines import prepare

    tracking = _store(tmp_path)
    capsys.readouterr()
    assert main(["figures", "--checkpoint", fresh_checkpoint, "--data", train_data, "--out", str(tmp_path / "figs"),
                 "--tracking-uri", tracking, "--experiment", "figures-test", "--feature-actors", "1"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    for name, size in (("conv1_kernels.png", (600, 450)), ("nearest_neighbours.png", (1000, 800)),
                       ("training_curves.png", (600, 400))):
        assert_png_shows_something(tmp_path / "figs" / name, min_size=size)
    manifest = prepare.load_manifest(train_data)
    assert summary["train_images_searched"] == manifest["splits"]["train"]["rows"]
    assert summary["lr_drops"] == [[6, pytest.approx(0.001)], [9, pytest.approx(0.0001)]]

    figures = json.loads(Path(mlflow.MlflowClient(tracking).download_artifacts(
        summary["mlflow_run_id"], "figures.json", str(tmp_path))).read_text())
    assert len(figures["queries"]) == 5 and len({q["key"] for q in figures["queries"]}) == 5
    words = {c["label"]: c["words"] for c in manifest["classes"]}
    for q in figures["queries"]:
        assert q["key"].startswith("ILSVRC2012_val_") and q["words"] == words[q["label"]]
        probs = [t["probability"] for t in q["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert [t["words"] for t in q["top"]] == [words[t["label"]] for t in q["top"]]
        distances = [n["distance"] for n in q["neighbours"]]
        assert len(distances) == 6 and distances == sorted(distances)
        assert all(not n["key"].startswith("ILSVRC2012_val_") for n in q["neighbours"])
    # the reported distance is the fc7 distance of the two images, as the network computes it here
    q = figures["queries"][0]
    first = q["neighbours"][0]
    backbone = load_backbone(fresh_checkpoint, imagenet_stats=train_data)
    pair = [stored_images(train_data, "val", [q["key"]])[q["key"]][1],
            stored_images(train_data, "train", [first["key"]])[first["key"]][1]]
    x = backbone.augmentation.eval_center(torch.from_numpy(np.stack(pair).transpose(0, 3, 1, 2).copy()))
    with torch.no_grad():
        fc7 = backbone.model.forward_features(x, "fc7")
    assert float((fc7[0] - fc7[1]).norm()) == pytest.approx(first["distance"], rel=1e-3)

    client = mlflow.MlflowClient(tracking)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.run_name == "figures-checkpoint_000010" and run.data.tags["alexnet.stage"] == "figures"
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "figures")) == [
        "figures/conv1_kernels.png", "figures/nearest_neighbours.png", "figures/training_curves.png"]

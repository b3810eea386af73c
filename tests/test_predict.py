"""`alexnet predict`: top-k class words from a trained checkpoint (the same numbers as evaluation), a registered
model resolved through a real MLflow store, a torchvision-format state dict, and bad files named in one line."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from alexnet import cli
from alexnet.predict import class_probabilities, load_image, load_predictor, predict, read_file_list

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def val_files(train_data, tmp_path_factory) -> dict:
    """The validation images of ``train_data`` as files (the same synthetic set in the ImageFolder layout), the
    decodable ones in the prepared val split's order (sorted by key), with their labels."""
    from pipelines.synth import write_synthetic_imagenet

    root = tmp_path_factory.mktemp("predict-files")
    info = write_synthetic_imagenet(root, layout="imagefolder", classes=10, train_per_class=40, val_per_class=10,
                                    size=200, seed=3)
    good = sorted((k, w) for k, w in info.val if k not in info.bad)
    return {"paths": [str(root / "val" / w / f"{k}.JPEG") for k, w in good],
            "labels": [info.label(w) for _, w in good], "info": info, "root": root}


def _errors(result: dict, labels: list[int]) -> tuple[float, float]:
    top1 = [item["predictions"][0]["label"] != y for item, y in zip(result["images"], labels)]
    top5 = [y not in [p["label"] for p in item["predictions"][:5]] for item, y in zip(result["images"], labels)]
    return sum(top1) / len(labels), sum(top5) / len(labels)


def _torchvision_state_dict(path: Path) -> Path:
    """Random weights in torchvision's key layout (features.N / classifier.N), as alexnet-owt-7be5be79.pth is."""
    from torchvision.models import alexnet

    torch.manual_seed(0)
    torch.save(alexnet(weights=None).state_dict(), path)
    return path


# --- a checkpoint of `alexnet train` ----------------------------------------------------------------------------


def test_predictions_of_a_trained_checkpoint_match_its_evaluation(trained_imagenet, train_data, val_files):
    """Files predicted one by one give the evaluation's top-1/top-5 errors on the same images: the same
    preprocessing (the manifest's recipe, then the checkpoint's normalisation)."""
    from alexnet.evaluate import evaluate_checkpoint
    from pipelines import prepare

    checkpoint, n = trained_imagenet["result"].checkpoint, 40
    paths, labels = val_files["paths"][:n], val_files["labels"][:n]
    predictor = load_predictor(checkpoint)
    result = predict(predictor, paths, crops=1, topk=5)
    assert result["checkpoint"] == checkpoint and result["crops"] == 1 and result["topk"] == 5
    words = {c["wnid"]: c["words"] for c in prepare.load_manifest(train_data)["classes"]}
    for item, path in zip(result["images"], paths):
        assert item["image"] == path and [p["rank"] for p in item["predictions"]] == [1, 2, 3, 4, 5]
        probs = [p["probability"] for p in item["predictions"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(p["words"] == words[p["wnid"]] and p["words"] for p in item["predictions"])
    top1, top5 = _errors(result, labels)
    evaluation = evaluate_checkpoint(checkpoint, train_data, crops=1, limit=n)
    assert evaluation["images"] == n
    assert abs(top1 - evaluation["top1_err"]) <= 1 / n and abs(top5 - evaluation["top5_err"]) <= 1 / n
    assert top1 < 0.75, top1  # learned: chance is 0.9


def test_ten_crops_average_ten_softmaxes_and_sum_to_one(trained_imagenet, val_files):
    predictor = load_predictor(trained_imagenet["result"].checkpoint)
    images = torch.from_numpy(np.stack([load_image(p, predictor.recipe) for p in val_files["paths"][:4]]))
    one, ten = class_probabilities(predictor, images, crops=1), class_probabilities(predictor, images, crops=10)
    assert one.shape == ten.shape == (4, 10)
    torch.testing.assert_close(one.sum(-1), torch.ones(4))
    torch.testing.assert_close(ten.sum(-1), torch.ones(4))
    assert not torch.allclose(one, ten)  # the corners and reflections do count
    patches = list(predictor.augmentation.iter_ten_crops(images))
    with torch.no_grad():
        by_hand = torch.stack([predictor.model(p).softmax(-1) for p in patches]).mean(0)
    torch.testing.assert_close(ten, by_hand)
    result = predict(predictor, val_files["paths"][:4], crops=10, topk=3)
    assert result["crops"] == 10 and all(len(item["predictions"]) == 3 for item in result["images"])
    top = [item["predictions"][0]["probability"] for item in result["images"]]
    assert top == pytest.approx(ten.max(-1).values.tolist(), abs=1e-6)


def test_a_registered_model_resolves_to_its_training_runs_checkpoint(trained_imagenet, val_files):
    """models:/alexnet@champion, registered as the flow registers it (a version of the model the training run
    logged, with an alias), in the training's real sqlite store."""
    result, store = trained_imagenet["result"], f"sqlite:///{trained_imagenet['tmp'] / 'mlflow.db'}"
    client = mlflow.MlflowClient(store)
    name = "alexnet-predict-test"
    mlflow.set_tracking_uri(store)
    version = mlflow.register_model(f"runs:/{result.mlflow_run_id}/model", name)
    client.set_registered_model_alias(name, "champion", version.version)
    paths = val_files["paths"][:3]
    direct = predict(load_predictor(result.checkpoint), paths)
    for uri in (f"models:/{name}@champion", f"models:/{name}/{version.version}"):
        registered = predict(load_predictor(uri, tracking_uri=store), paths)
        assert registered["checkpoint"] == result.checkpoint
        assert registered["images"] == direct["images"]
    with pytest.raises(ValueError, match=f"models:/{name}@nobody.*not found in the MLflow registry"):
        load_predictor(f"models:/{name}@nobody", tracking_uri=store)


def test_cli_prints_a_table_or_json_from_a_file_list(trained_imagenet, val_files, tmp_path, capsys):
    paths = val_files["paths"][:3]
    listing = tmp_path / "images.txt"
    listing.write_text("# validation images\n" + "\n".join(paths[1:]) + "\n\n")
    assert read_file_list(str(listing)) == paths[1:]
    checkpoint = trained_imagenet["result"].checkpoint
    assert cli.main(["predict", paths[0], "--files", str(listing), "--checkpoint", checkpoint, "--json",
                     "--topk", "2"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [item["image"] for item in payload["images"]] == paths
    assert all(len(item["predictions"]) == 2 for item in payload["images"])
    assert cli.main(["predict", paths[0], "--checkpoint", checkpoint]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == paths[0] and len(table) == 6 and table[1].lstrip().startswith("1.")
    wnid = val_files["info"].wnids[payload["images"][0]["predictions"][0]["label"]]
    assert wnid in table[1] and val_files["info"].words[wnid] in table[1]


def test_bad_images_fail_in_one_line_naming_the_file(trained_imagenet, val_files, tmp_path, capsys):
    checkpoint = trained_imagenet["result"].checkpoint
    info, root = val_files["info"], val_files["root"]
    truncated = next(k for k, why in info.bad.items() if why == "truncated")
    split = "val" if truncated.startswith("ILSVRC") else "train"
    bad = next((root / split).rglob(f"{truncated}.JPEG"))
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    for path, message in ((bad, "not a readable image"), (notes, "not a readable image"),
                          (tmp_path / "missing.jpg", "no such image file")):
        assert cli.main(["predict", val_files["paths"][0], str(path), "--checkpoint", checkpoint]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.startswith("alexnet predict: error: ") and str(path) in err and message in err, err
        assert len(err.splitlines()) == 1 and not captured.out
    assert cli.main(["predict", "--checkpoint", checkpoint]) == 2
    assert "no images" in capsys.readouterr().err


# --- torchvision weights ------------------------------------------------------------------------------------------


def test_torchvision_state_dict_predicts_imagenet_categories_with_torchvisions_transform(tmp_path):
    from torchvision.models import AlexNet_Weights

    weights = _torchvision_state_dict(tmp_path / "alexnet-owt.pth")
    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(photo)
    predictor = load_predictor(str(weights))
    assert predictor.description["kind"] == "torchvision" and len(predictor.classes) == 1000
    result = predict(predictor, [str(photo)], topk=5)
    categories = AlexNet_Weights.IMAGENET1K_V1.meta["categories"]
    preds = result["images"][0]["predictions"]
    assert [p["words"] for p in preds] == [categories[p["label"]] for p in preds]
    assert result["model"] == "torchvision" and 0 < sum(p["probability"] for p in preds) <= 1
    # the network's input is torchvision's own eval transform of the file (resize 256, centre crop 224, mean/std)
    ours = predictor.augmentation.eval_center(torch.from_numpy(load_image(str(photo), predictor.recipe))[None])
    with Image.open(photo) as img:
        theirs = AlexNet_Weights.IMAGENET1K_V1.transforms()(img.convert("RGB"))[None]
    assert ours.shape == theirs.shape == (1, 3, 224, 224)
    assert (ours - theirs).abs().mean() < 0.05, (ours - theirs).abs().mean()
    with torch.no_grad():
        probs = predictor.model(theirs).softmax(-1)[0]
    assert preds[0]["probability"] == pytest.approx(float(probs.max()), rel=0.05)


def test_predict_has_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: alexnet predict" in out and "models:/alexnet@champion" in out and "--files LIST" in out

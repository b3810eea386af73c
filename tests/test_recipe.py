"""The paper's recipe at the paper's pixel scale: LRN is a real normalisation on raw 0-255 pixels minus the mean
image (and a constant factor on [0, 1], which is why the paper preset feeds 0-255), and every path (training,
evaluation, transfer) builds its input normalisation from the checkpoint's config in one place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet.augment import Augmentation
from alexnet.config import Config, load_config
from alexnet.model import build_model
from alexnet.train import augmentation_for, checkpoint_config
from pipelines import imaging
from pipelines import stats as stats_mod
from pipelines.synth import write_synthetic_imagenet

ROOT = Path(__file__).resolve().parents[1]
#: LRN is "not a constant": the best constant rescaling c * a of its input a leaves at least this relative residual
#: ||b - c a|| / ||b|| at norm1 or norm2 (measured at 0-255: 0.028 at norm1, 1e-3 at norm2; on [0, 1]: 5e-7, 7e-6).
LRN_MARGIN = 1e-2


@pytest.fixture(scope="module")
def prepared_batch(tmp_path_factory) -> tuple[torch.Tensor, dict, np.ndarray]:
    """16 synthetic ImageNet images through the preparation's own functions (decode, resize 256, centre crop),
    as uint8 [N, 3, 256, 256], with their statistics computed by the stats stage's sums (on [0, 1])."""
    out = tmp_path_factory.mktemp("lrn") / "imagefolder"
    write_synthetic_imagenet(out, layout="imagefolder", classes=4, train_per_class=4, val_per_class=1, size=200,
                             seed=0, quirks=False)
    files = sorted(out.rglob("*.JPEG"))[:16]
    blobs = [imaging.encode(imaging.resize_center_crop(imaging.decode(f.read_bytes()), size=256), image_format="raw")
             for f in files]
    sums = stats_mod.partial_sums({"image": blobs}, image_format="raw", size=256)
    stats, mean_image = stats_mod.finalize(int(sums["count"][0]), sums["sum_image"][0], sums["sum_rgb"][0],
                                           sums["sum_outer"][0])
    images = np.stack([imaging.decode_stored(b, image_format="raw", size=256) for b in blobs])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), stats, mean_image


def _lrn_residuals(pixel_scale: int, batch) -> dict[str, float]:
    images, stats, mean_image = batch
    cfg = load_config(ROOT / "configs" / "paper.yaml", [f"data.pixel_scale={pixel_scale}"])
    x = augmentation_for(cfg, stats, mean_image).train(images, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = build_model(num_classes=10, init=cfg.model.init).eval()  # the paper's init: N(0, 0.01), biases 1
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [model.features.get_submodule(name).register_forward_hook(
        lambda m, i, o, name=name: seen.__setitem__(name, (i[0].double().flatten(), o.double().flatten())))
        for name in ("norm1", "norm2")]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    residuals = {}
    for name, (a, b) in seen.items():
        c = (a @ b) / (a @ a)  # least-squares constant
        residuals[name] = float((b - c * a).norm() / b.norm())
    return residuals


def test_lrn_normalises_at_the_papers_pixel_scale(prepared_batch) -> None:
    assert load_config(ROOT / "configs" / "paper.yaml").data.pixel_scale == 255
    residuals = _lrn_residuals(255, prepared_batch)
    assert max(residuals.values()) > LRN_MARGIN, residuals


def test_lrn_is_a_constant_factor_on_unit_pixels(prepared_batch) -> None:
    # Why the paper net gets 0-255: on [0, 1] alpha * sum(a^2) is ~1e-6 of k = 2 and LRN is b = 2^-0.75 a.
    residuals = _lrn_residuals(1, prepared_batch)
    assert max(residuals.values()) < 1e-4, residuals


def test_one_definition_of_the_input_from_the_config(prepared_batch) -> None:
    images, stats, mean_image = prepared_batch
    paper = Config()
    aug = augmentation_for(paper, stats, mean_image)
    assert (aug.pixel_scale, aug.normalize, aug.lighting_std, aug.crop) == (255, "mean_image", 0.1, 224)
    centre = aug.eval_center(images)
    expected = images[:, :, 16:240, 16:240].double() - 255 * torch.from_numpy(mean_image)[:, 16:240, 16:240].double()
    torch.testing.assert_close(centre.double(), expected, rtol=0, atol=1e-3)
    unit = augmentation_for(load_config(None, ["data.pixel_scale=1"]), stats, mean_image).eval_center(images)
    torch.testing.assert_close(unit * 255, centre, rtol=0, atol=1e-3)
    # A checkpoint written before data.pixel_scale existed was trained on [0, 1]; a new one keeps its own.
    old = paper.to_dict()
    del old["data"]["pixel_scale"]
    assert checkpoint_config({"config": old}).data.pixel_scale == 1
    assert checkpoint_config({"config": paper.to_dict()}).data.pixel_scale == 255
    with pytest.raises(ValueError, match="pixel_scale"):
        augmentation_for(load_config(None, ["data.pixel_scale=100"]), stats, mean_image)

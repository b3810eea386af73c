"""Unit tests of alexnet.augment: random crops and flips, PCA lighting, normalisation, test-time crops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from alexnet.augment import (
    IMAGENET_PCA_EIGVAL,
    IMAGENET_PCA_EIGVEC,
    Augmentation,
    TrainParams,
    predict_ten_crop,
    ten_crop_offsets,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

EIGVAL = torch.tensor(IMAGENET_PCA_EIGVAL)
#: cuda-convnet2's reading of the paper's l_i: the std along each eigenvector, sqrt of the covariance's eigenvalue.
STDEV = EIGVAL.sqrt()
EIGVEC = torch.tensor(IMAGENET_PCA_EIGVEC)


def identity_normalisation(*, crop: int = 224, lighting_std: float = 0.0) -> Augmentation:
    """Per-channel normalisation that does nothing, so outputs are pixels / 255 (+ lighting)."""
    return Augmentation(
        mean_rgb=(0.0, 0.0, 0.0),
        std_rgb=(1.0, 1.0, 1.0),
        eigval=IMAGENET_PCA_EIGVAL,
        eigvec=IMAGENET_PCA_EIGVEC,
        normalize="channel",
        lighting_std=lighting_std,
        crop=crop,
    )


def coordinate_images(n: int, size: int) -> torch.Tensor:
    """uint8 images whose red value is the row, green the column, blue the image's index (mod 256)."""
    rows = torch.arange(size, dtype=torch.uint8)[:, None].expand(size, size)
    cols = torch.arange(size, dtype=torch.uint8)[None, :].expand(size, size)
    ids = (torch.arange(n) % 256).to(torch.uint8)[:, None, None].expand(n, size, size)
    return torch.stack([rows.expand(n, -1, -1), cols.expand(n, -1, -1), ids], dim=1).contiguous()


def random_images(n: int, seed: int, size: int = 256) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def read_coordinates(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, flipped) of each patch cut from coordinate_images, through identity_normalisation."""
    values = (out * 255).round().long()
    top = values[:, 0, 0, 0]
    first_col, last_col = values[:, 1, 0, 0], values[:, 1, 0, -1]
    flipped = first_col > last_col
    left = torch.minimum(first_col, last_col)
    return top, left, flipped


@pytest.fixture(scope="module")
def mean_image() -> torch.Tensor:
    return torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def stats() -> dict:
    """A stats.json-shaped mapping (fb.resnet.torch values), eigenvectors as columns."""
    return {
        "mean_rgb": [0.485, 0.456, 0.406],
        "std_rgb": [0.229, 0.224, 0.225],
        "eigval": list(IMAGENET_PCA_EIGVAL),
        "eigvec": [list(row) for row in IMAGENET_PCA_EIGVEC],
        "num_pixels": 123,
    }


# -- random crops and flips ------------------------------------------------------------------------------


def test_apply_train_cuts_the_requested_patches() -> None:
    augmentation = identity_normalisation()
    x = coordinate_images(6, 256)
    params = TrainParams(
        top=torch.tensor([0, 32, 5, 17, 32, 0]),
        left=torch.tensor([0, 32, 29, 3, 0, 32]),
        flip=torch.tensor([False, True, True, False, False, True]),
        alpha=torch.zeros(6, 3),
    )
    out = augmentation.apply_train(x, params)
    assert out.shape == (6, 3, 224, 224) and out.dtype == torch.float32
    top, left, flipped = read_coordinates(out)
    assert torch.equal(top, params.top) and torch.equal(left, params.left) and torch.equal(flipped, params.flip)
    values = (out * 255).round().long()
    steps = torch.arange(224)
    for i in range(6):  # contiguous rows and columns, in the right direction, from the right image
        assert torch.equal(values[i, 0, :, 0], params.top[i] + steps)
        cols = params.left[i] + (steps.flip(0) if params.flip[i] else steps)
        assert torch.equal(values[i, 1, 0, :], cols)
        assert torch.all(values[i, 2] == i)


def test_vectorised_crop_equals_per_sample_slicing(mean_image: torch.Tensor, stats: dict) -> None:
    augmentation = Augmentation.from_stats(stats, mean_image, normalize="mean_image")
    x = random_images(8, seed=3)
    params = augmentation.sample_train_params(8, torch.Generator().manual_seed(11))
    out = augmentation.apply_train(x, params)
    for i in range(8):
        t, l = int(params.top[i]), int(params.left[i])
        patch = x[i, :, t : t + 224, l : l + 224].double() / 255
        mean_patch = mean_image[:, t : t + 224, l : l + 224].double()
        if params.flip[i]:
            patch, mean_patch = patch.flip(-1), mean_patch.flip(-1)
        offset = EIGVEC.double() @ (params.alpha[i].double() * STDEV.double())
        expected = patch + offset[:, None, None] - mean_patch
        torch.testing.assert_close(out[i].double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("normalize", ["mean_image", "channel"])
def test_cpu_slicing_and_batched_gather_agree(normalize: str, mean_image: torch.Tensor, stats: dict) -> None:
    # apply_train slices per image on the CPU and gathers on accelerators: both must give the same batch
    augmentation = Augmentation.from_stats(stats, mean_image, normalize=normalize)
    x = random_images(16, seed=5)
    params = augmentation.sample_train_params(16, torch.Generator().manual_seed(2))
    assert params.flip.any() and not params.flip.all()
    sliced = augmentation.apply_train(x, params)
    gathered = augmentation._apply_train_gathered(x, params)
    torch.testing.assert_close(sliced, gathered, rtol=0, atol=1e-6)


def test_crop_offsets_cover_the_range_uniformly_and_flip_half_the_time() -> None:
    # 40x40 images with an 8x8 crop have the same 33x33 offsets as 256x256 with 224, at a fraction of the cost.
    augmentation = identity_normalisation(crop=8)
    per_cell = 20
    n = 33 * 33 * per_cell
    out = augmentation.train(coordinate_images(n, 40), torch.Generator().manual_seed(0))
    top, left, flipped = read_coordinates(out)
    assert top.min() == 0 and top.max() == 32 and left.min() == 0 and left.max() == 32
    counts = torch.bincount(top * 33 + left, minlength=33 * 33).double()
    assert counts.min() > 0, "every one of the 33x33 offsets occurs"
    # Chi-square against uniform: 1088 degrees of freedom, mean 1088, sd ~46.6; allow 5 sd.
    chi2 = ((counts - per_cell) ** 2 / per_cell).sum().item()
    assert chi2 < 1088 + 5 * math.sqrt(2 * 1088)
    for marginal in (top, left):
        marginal_counts = torch.bincount(marginal, minlength=33).double()
        expected = n / 33
        assert ((marginal_counts - expected) ** 2 / expected).sum().item() < 32 + 5 * math.sqrt(2 * 32)
    # Flips: Binomial(n, 1/2), allow 5 sd.
    assert abs(flipped.sum().item() - n / 2) < 5 * math.sqrt(n / 4)


def test_train_is_reproducible_and_equals_sample_then_apply(mean_image: torch.Tensor, stats: dict) -> None:
    augmentation = Augmentation.from_stats(stats, mean_image)
    x = random_images(4, seed=5)
    first = augmentation.train(x, torch.Generator().manual_seed(42))
    second = augmentation.train(x, torch.Generator().manual_seed(42))
    other = augmentation.train(x, torch.Generator().manual_seed(43))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    params = augmentation.sample_train_params(4, torch.Generator().manual_seed(42))
    assert torch.equal(first, augmentation.apply_train(x, params))


# -- PCA lighting ----------------------------------------------------------------------------------------


def test_lighting_uses_eigenvector_columns() -> None:
    # a = (1, 0, 0) adds sqrt(l1) * p1, the first *column* of eigvec; a = (0, 0, 1) adds sqrt(l3) * p3.
    augmentation = identity_normalisation(crop=4)
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    params = TrainParams(
        top=torch.zeros(2, dtype=torch.long),
        left=torch.zeros(2, dtype=torch.long),
        flip=torch.zeros(2, dtype=torch.bool),
        alpha=torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
    )
    out = augmentation.apply_train(x, params)
    torch.testing.assert_close(out[0, :, 0, 0], math.sqrt(0.2175) * torch.tensor([-0.5675, -0.5808, -0.5836]))
    torch.testing.assert_close(out[1, :, 0, 0], math.sqrt(0.0045) * torch.tensor([0.4009, -0.8140, 0.4203]))


def test_lighting_covariance_matches_pca() -> None:
    n = 20_000
    augmentation = identity_normalisation(crop=4, lighting_std=0.1)
    out = augmentation.train(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.Generator().manual_seed(0))
    offsets = out[:, :, 0, 0].double()
    # One offset per image, the same for all its pixels.
    assert torch.equal(out, offsets.float()[:, :, None, None].expand_as(out))
    expected = EIGVEC.double() @ torch.diag((0.1 * STDEV.double()) ** 2) @ EIGVEC.double().T
    empirical = torch.cov(offsets.T)
    assert torch.linalg.matrix_norm(empirical - expected) < 0.03 * torch.linalg.matrix_norm(expected)
    # Along each principal axis separately (the small ones are invisible in the matrix norm): the
    # coordinates have std 0.1 * sqrt(l_i) and are uncorrelated.
    coordinates = offsets @ EIGVEC.double()
    torch.testing.assert_close(coordinates.std(dim=0), 0.1 * STDEV.double(), rtol=0.03, atol=0)
    correlation = torch.corrcoef(coordinates.T)
    assert (correlation - torch.eye(3, dtype=torch.float64)).abs().max() < 0.05
    assert offsets.mean(dim=0).abs().max() < 4 * 0.1 * math.sqrt(IMAGENET_PCA_EIGVAL[0]) / math.sqrt(n)


def test_lighting_std_zero_disables_noise() -> None:
    augmentation = identity_normalisation(crop=4, lighting_std=0.0)
    out = augmentation.train(torch.zeros(16, 3, 4, 4, dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert torch.all(out == 0)


# -- normalisation ---------------------------------------------------------------------------------------


def test_mean_image_subtraction_on_a_flipped_crop(mean_image: torch.Tensor, stats: dict) -> None:
    augmentation = Augmentation.from_stats(stats, mean_image, normalize="mean_image", lighting_std=0.1)
    x = random_images(2, seed=9)
    alpha = torch.tensor([[0.0, 0.0, 0.0], [0.3, -0.2, 0.1]])
    params = TrainParams(
        top=torch.tensor([7, 30]), left=torch.tensor([21, 2]), flip=torch.tensor([True, True]), alpha=alpha
    )
    out = augmentation.apply_train(x, params)
    # By hand: output pixel (r, c) is source pixel (7 + r, 21 + 223 - c), the patch at rows 7..230 and
    # columns 21..244 read right to left, minus the mean image at the same source pixel.
    src_r = 7 + np.arange(224)[:, None]
    src_c = 21 + 223 - np.arange(224)[None, :]
    image0, mean0 = x[0].numpy().astype(np.float64), mean_image.numpy().astype(np.float64)
    expected0 = image0[:, src_r, src_c] / 255 - mean0[:, src_r, src_c]
    assert expected0[:, 0, 0].tolist() == (image0[:, 7, 244] / 255 - mean0[:, 7, 244]).tolist()
    torch.testing.assert_close(out[0].double(), torch.from_numpy(expected0), rtol=0, atol=1e-6)
    offset = EIGVEC.double() @ (alpha[1].double() * STDEV.double())
    expected1 = (
        x[1, :, 30:254, 2:226].flip(-1).double() / 255
        + offset[:, None, None]
        - mean_image[:, 30:254, 2:226].flip(-1).double()
    )
    torch.testing.assert_close(out[1].double(), expected1, rtol=0, atol=1e-6)


def test_channel_normalisation(stats: dict) -> None:
    augmentation = Augmentation.from_stats(stats, normalize="channel", lighting_std=0.0)
    x = random_images(2, seed=4)
    params = augmentation.sample_train_params(2, torch.Generator().manual_seed(1))
    out = augmentation.apply_train(x, params)
    mean = torch.tensor(stats["mean_rgb"], dtype=torch.float64)[:, None, None]
    std = torch.tensor(stats["std_rgb"], dtype=torch.float64)[:, None, None]
    for i in range(2):
        t, l = int(params.top[i]), int(params.left[i])
        patch = x[i, :, t : t + 224, l : l + 224].double() / 255
        patch = patch.flip(-1) if params.flip[i] else patch
        torch.testing.assert_close(out[i].double(), (patch - mean) / std, rtol=0, atol=1e-5)


# -- evaluation crops ------------------------------------------------------------------------------------


def test_centre_crop_is_the_central_region(mean_image: torch.Tensor, stats: dict) -> None:
    x = random_images(3, seed=2)
    out = identity_normalisation().eval_center(x)
    torch.testing.assert_close(out, x[:, :, 16:240, 16:240].float() / 255)
    out = Augmentation.from_stats(stats, mean_image).eval_center(x)
    expected = x[:, :, 16:240, 16:240].double() / 255 - mean_image[:, 16:240, 16:240].double()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    assert out.dtype == torch.float32


def _ten_patches_by_hand(x: torch.Tensor, mean_image: torch.Tensor) -> list[torch.Tensor]:
    corners = [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    patches = []
    for flip in (False, True):
        for t, l in corners:
            patch = x[:, :, t : t + 224, l : l + 224].double() / 255 - mean_image[:, t : t + 224, l : l + 224].double()
            patches.append(patch.flip(-1) if flip else patch)
    return patches


def test_ten_crop_patches(mean_image: torch.Tensor, stats: dict) -> None:
    assert ten_crop_offsets(256, 256, 224) == [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    x = random_images(2, seed=6)
    out = Augmentation.from_stats(stats, mean_image).eval_ten_crop(x)
    assert out.shape == (2, 10, 3, 224, 224) and out.dtype == torch.float32
    for k, expected in enumerate(_ten_patches_by_hand(x, mean_image)):
        torch.testing.assert_close(out[:, k].double(), expected, rtol=0, atol=1e-6)


def _tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    # An asymmetric stride-8 convolution, so reflections and positions change the output.
    return nn.Sequential(
        nn.Conv2d(3, 4, kernel_size=8, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5)
    ).eval()


def test_predict_ten_crop_averages_softmaxes(mean_image: torch.Tensor, stats: dict) -> None:
    model = _tiny_classifier()
    x = random_images(3, seed=8)
    probs = predict_ten_crop(model, x, Augmentation.from_stats(stats, mean_image))
    with torch.no_grad():
        by_hand = torch.stack([model(p.float()).softmax(dim=-1) for p in _ten_patches_by_hand(x, mean_image)]).mean(0)
    assert probs.shape == (3, 5) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(3))
    # Averaging softmaxes, not logits: differs from the softmax of the mean logit.
    with torch.no_grad():
        mean_logit = torch.stack([model(p.float()) for p in _ten_patches_by_hand(x, mean_image)]).mean(0)
    assert not torch.allclose(probs, mean_logit.softmax(dim=-1), rtol=0, atol=1e-7)
    with pytest.raises(ValueError):
        predict_ten_crop(model.train(), x, Augmentation.from_stats(stats, mean_image))


# -- devices, dtypes, construction ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_device_agnostic_float32(device: str, mean_image: torch.Tensor, stats: dict) -> None:
    x = random_images(2, seed=1).to(device)
    for normalize in ("mean_image", "channel"):
        cpu_stats = Augmentation.from_stats(stats, mean_image, normalize=normalize)
        for augmentation in (cpu_stats, cpu_stats.to(device)):
            outputs = [
                augmentation.train(x, torch.Generator().manual_seed(0)),
                augmentation.eval_center(x),
                augmentation.eval_ten_crop(x),
            ]
            for out in outputs:
                assert out.device.type == torch.device(device).type
                assert out.dtype == torch.float32
            expected = cpu_stats.train(x.cpu(), torch.Generator().manual_seed(0))
            torch.testing.assert_close(outputs[0].cpu(), expected, rtol=0, atol=1e-6)


def test_from_stats_and_defaults(mean_image: torch.Tensor, stats: dict) -> None:
    augmentation = Augmentation.from_stats(stats, mean_image.numpy())
    assert augmentation.normalize == "mean_image" and augmentation.lighting_std == 0.1 and augmentation.crop == 224
    torch.testing.assert_close(augmentation.eigvec, EIGVEC)
    assert augmentation.mean_image is not None and augmentation.mean_image.dtype == torch.float32
    default = Augmentation.imagenet_default()
    assert default.normalize == "channel"
    torch.testing.assert_close(default.eigval, EIGVAL)
    # The fb.resnet.torch eigenvectors are orthonormal columns.
    torch.testing.assert_close(EIGVEC.T @ EIGVEC, torch.eye(3), atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "change",
    [
        {"eigval": [0.0045, 0.0188, 0.2175]},  # ascending
        {"eigvec": [[1.0, 0.0], [0.0, 1.0]]},
        {"std_rgb": [0.0, 1.0, 1.0]},
    ],
)
def test_from_stats_rejects_bad_stats(stats: dict, mean_image: torch.Tensor, change: dict) -> None:
    with pytest.raises(ValueError):
        Augmentation.from_stats(stats | change, mean_image)


def test_rejects_bad_inputs(stats: dict, mean_image: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        Augmentation.from_stats({"mean_rgb": [0, 0, 0]}, mean_image)
    with pytest.raises(ValueError):
        Augmentation.from_stats(stats)  # mean_image normalisation without a mean image
    augmentation = Augmentation.from_stats(stats, mean_image)
    with pytest.raises(TypeError):
        augmentation.eval_center(torch.rand(1, 3, 256, 256))
    with pytest.raises(ValueError):
        augmentation.eval_center(torch.zeros(1, 256, 256, 3, dtype=torch.uint8))
    with pytest.raises(ValueError):
        augmentation.eval_center(torch.zeros(1, 3, 200, 200, dtype=torch.uint8))
    with pytest.raises(ValueError):
        augmentation.train(torch.zeros(1, 3, 240, 240, dtype=torch.uint8), None)  # mean image is 256x256


# -- pixel scale -------------------------------------------------------------------------------------------


def test_lighting_noise_in_grey_levels(stats: dict) -> None:
    # ImageNet's top eigenvalue of the RGB covariance: 6,927 on 0-255 pixels (stats.json holds it on [0, 1]).
    # cuda-convnet2's reading, a_i times the std sqrt(l_i): 0.1 * sqrt(6927) = 8.3 grey levels along p1, in
    # either unit (the literal variance would give 0.1 * 6927 = 693 grey levels).
    eigval = [6927 / 255**2, 0.0188, 0.0045]
    n = 20_000
    for scale in (255, 1):
        augmentation = Augmentation.from_stats(stats | {"eigval": eigval}, normalize="channel", lighting_std=0.1,
                                               pixel_scale=scale)
        params = augmentation.sample_train_params(n, torch.Generator().manual_seed(0))
        offsets = augmentation.lighting_offsets(params.alpha).double() * (255 / scale)  # in grey levels
        along_p1 = offsets @ EIGVEC.double()[:, 0]
        assert along_p1.std().item() == pytest.approx(0.1 * math.sqrt(6927), rel=0.03)  # 8.32
        assert 8.0 < along_p1.std().item() < 8.6


def test_pixel_scale_255_is_raw_pixels_minus_the_mean_image(mean_image: torch.Tensor, stats: dict) -> None:
    x = random_images(2, seed=5)
    unit = Augmentation.from_stats(stats, mean_image, lighting_std=0.1)
    raw = Augmentation.from_stats(stats, mean_image, lighting_std=0.1, pixel_scale=255)
    params = raw.sample_train_params(2, torch.Generator().manual_seed(3))
    t, l = int(params.top[0]), int(params.left[0])
    patch = x[0, :, t : t + 224, l : l + 224].double() - 255 * mean_image[:, t : t + 224, l : l + 224].double()
    patch = patch.flip(-1) if params.flip[0] else patch
    offset = raw.lighting_offsets(params.alpha[:1]).double()[0]
    out = raw.apply_train(x, params)
    torch.testing.assert_close(out[0].double(), patch + offset[:, None, None], rtol=0, atol=1e-3)
    torch.testing.assert_close(out, unit.apply_train(x, params) * 255, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(raw.eval_ten_crop(x), unit.eval_ten_crop(x) * 255, rtol=1e-5, atol=1e-3)
    # Channel normalisation divides by the std: the unit cancels out.
    channel = [Augmentation.from_stats(stats, normalize="channel", pixel_scale=s).eval_center(x) for s in (1, 255)]
    torch.testing.assert_close(channel[0], channel[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pixel_scale"):
        Augmentation.from_stats(stats, mean_image, pixel_scale=100)

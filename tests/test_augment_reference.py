"""The augmentation's outputs, path by path, against the implementation they replaced (issue 16).

``Reference`` below is the previous code of ``alexnet.augment`` (commit 1de4175), copied verbatim where it computed
pixels: the per-image NumPy slicing of the CPU training path, the batched gather of the accelerator path, and the
centre and ten-crop evaluation. For the same random draws (crop offsets, flips, lighting coefficients) the new code
must give exactly the same float32 values: the comparisons have no tolerance (``torch.equal``).
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from alexnet.augment import Augmentation, BufferPool, TrainParams, ten_crop_offsets


class Reference:
    """The pre-issue-16 pixel code, as functions of an ``Augmentation`` (its statistics are unchanged)."""

    def __init__(self, aug: Augmentation) -> None:
        self.aug = aug

    def train_sliced(self, x: torch.Tensor, params: TrainParams) -> torch.Tensor:
        aug = self.aug
        n, channels, _, _ = x.shape
        size = aug.crop
        pixels = x.numpy()
        out = np.empty((n, channels, size, size), dtype=np.float32)
        offsets = aug.lighting_offsets(params.alpha).numpy()[:, :, None, None]
        mean_image = (aug.mean_image * aug.pixel_scale).numpy() if aug.normalize == "mean_image" else None
        scale = np.float32(aug.pixel_scale / 255.0)
        for i, (top, left, flip) in enumerate(zip(params.top.tolist(), params.left.tolist(), params.flip.tolist())):
            rows, cols = slice(top, top + size), slice(left, left + size)
            step = -1 if flip else 1
            patch = out[i]
            np.multiply(pixels[i, :, rows, cols][:, :, ::step], scale, out=patch, casting="unsafe")
            patch += offsets[i]
            if mean_image is not None:
                patch -= mean_image[:, rows, cols][:, :, ::step]
        result = torch.from_numpy(out)
        return result if mean_image is not None else self.normalize_channels(result)

    def train_gathered(self, x: torch.Tensor, params: TrainParams) -> torch.Tensor:
        aug = self.aug
        n, channels, height, width = x.shape
        size = aug.crop
        steps = torch.arange(size, device=x.device)
        rows = params.top[:, None] + steps
        cols = params.left[:, None] + torch.where(params.flip[:, None], size - 1 - steps, steps)
        index = (rows[:, :, None] * width + cols[:, None, :]).reshape(n, 1, size * size)
        index = index.expand(n, channels, size * size)
        pixels = x.reshape(n, channels, height * width).gather(2, index).reshape(n, channels, size, size)
        out = pixels.to(torch.float32).mul_(aug.pixel_scale / 255.0)
        out += aug.lighting_offsets(params.alpha)[:, :, None, None]
        if aug.normalize == "mean_image":
            mean_image = (aug.mean_image * aug.pixel_scale).reshape(1, channels, height * width)
            out -= mean_image.expand(n, -1, -1).gather(2, index).reshape(n, channels, size, size)
            return out
        return self.normalize_channels(out)

    def normalize_channels(self, out: torch.Tensor) -> torch.Tensor:
        aug = self.aug
        mean = aug.mean_rgb[:, None, None] * aug.pixel_scale
        std = aug.std_rgb[:, None, None] * aug.pixel_scale
        return out.sub_(mean).div_(std)

    def patch(self, x: torch.Tensor, top: int, left: int) -> torch.Tensor:
        aug = self.aug
        rows, cols = slice(top, top + aug.crop), slice(left, left + aug.crop)
        out = x[:, :, rows, cols].to(torch.float32).mul_(aug.pixel_scale / 255.0)
        if aug.normalize == "mean_image":
            return out.sub_((aug.mean_image * aug.pixel_scale)[:, rows, cols])
        return self.normalize_channels(out)

    def ten_crop(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        patches = [self.patch(x, t, l) for t, l in ten_crop_offsets(height, width, self.aug.crop)]
        return torch.stack(patches + [p.flip(-1) for p in patches], dim=1)


def _augmentation(normalize: str, pixel_scale: int, lighting_std: float = 0.1) -> Augmentation:
    g = torch.Generator().manual_seed(7)
    mean_image = torch.rand((3, 256, 256), generator=g)  # an irregular mean image: every pixel position differs
    return Augmentation(
        mean_rgb=(0.485, 0.456, 0.406),
        std_rgb=(0.229, 0.224, 0.225),
        eigval=(0.2175, 0.0188, 0.0045),
        eigvec=((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203)),
        mean_image=mean_image,
        normalize=normalize,
        lighting_std=lighting_std,
        pixel_scale=pixel_scale,
    )


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


CASES = [  # (normalize, pixel_scale, lighting_std)
    ("mean_image", 255, 0.1),  # the paper's full augmentation on raw 0-255 pixels
    ("mean_image", 1, 0.1),  # the same on [0, 1]
    ("channel", 1, 0.1),  # torchvision-style normalisation
    ("channel", 255, 0.0),  # crop + flip only, no lighting
]


@pytest.mark.parametrize(("normalize", "pixel_scale", "lighting_std"), CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_train_is_identical_to_the_previous_implementation(normalize, pixel_scale, lighting_std, layout) -> None:
    aug = _augmentation(normalize, pixel_scale, lighting_std)
    x = _images(12)
    params = aug.sample_train_params(12, torch.Generator().manual_seed(3))
    assert params.flip.any() and not params.flip.all()  # both kinds of patch are compared
    ref = Reference(aug)
    expected = ref.train_sliced(x, params)
    assert torch.equal(ref.train_gathered(x, params), expected)  # the old two paths agreed exactly too
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)  # the reader's channels_last batches
    got = aug.apply_train(x, params)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected)
    # the same draws from a seeded generator: train() samples, then applies
    assert torch.equal(aug.train(x, torch.Generator().manual_seed(3)), expected)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_crop_flip_is_the_uint8_patch_train_starts_from(layout) -> None:
    aug = _augmentation("channel", 255, 0.0)
    x = _images(6, seed=4)
    params = aug.sample_train_params(6, torch.Generator().manual_seed(5))
    src = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    patches = aug.crop_flip(src, params)
    assert patches.dtype == torch.uint8 and patches.shape == (6, 3, 224, 224)
    for i in range(6):
        t, l = int(params.top[i]), int(params.left[i])
        expected = x[i, :, t : t + 224, l : l + 224]
        assert torch.equal(patches[i], expected.flip(-1) if params.flip[i] else expected)
    # lighting off, mean 0, std 1 (times pixel_scale 255): train's output is exactly these pixels / 255
    ident = Augmentation(mean_rgb=(0, 0, 0), std_rgb=(1, 1, 1), eigval=aug.eigval, eigvec=aug.eigvec,
                         normalize="channel", lighting_std=0.0, pixel_scale=255)
    assert torch.equal(ident.apply_train(x, params), patches.float() / 255)


def test_extreme_offsets_and_all_flips_are_identical() -> None:
    aug = _augmentation("mean_image", 255)
    x = _images(4, seed=1)
    params = TrainParams(
        top=torch.tensor([0, 32, 0, 32]), left=torch.tensor([0, 32, 32, 0]),
        flip=torch.tensor([True, True, False, True]), alpha=torch.randn(4, 3) * 0.1,
    )
    assert torch.equal(aug.apply_train(x, params), Reference(aug).train_sliced(x, params))


@pytest.mark.parametrize(("normalize", "pixel_scale", "lighting_std"), CASES)
def test_eval_paths_are_identical_to_the_previous_implementation(normalize, pixel_scale, lighting_std) -> None:
    aug = _augmentation(normalize, pixel_scale, lighting_std)
    x = _images(3, seed=2)
    ref = Reference(aug)
    assert torch.equal(aug.eval_center(x), ref.patch(x, 16, 16))
    assert torch.equal(aug.eval_ten_crop(x), ref.ten_crop(x))
    assert torch.equal(aug.eval_center(x.contiguous(memory_format=torch.channels_last)), ref.patch(x, 16, 16))


def test_outputs_in_use_are_never_overwritten() -> None:
    aug = _augmentation("mean_image", 255)
    x = _images(4)
    g = torch.Generator().manual_seed(0)
    first = aug.train(x, g)
    kept = first.clone()
    view = aug.train(x, g)[:, 0]  # only a view of the second output survives
    third = aug.train(x, g)
    assert torch.equal(first, kept)
    assert first.data_ptr() != third.data_ptr() and view.data_ptr() != third.data_ptr()


def test_buffer_pool_reuses_only_released_arrays() -> None:
    pool = BufferPool(keep=2)
    a = pool.take((2, 3), np.float32)
    b = pool.take((2, 3), np.float32)
    assert a is not b
    tensor = torch.from_numpy(b)  # the tensor keeps b's array in use after the name is gone
    b_address = tensor.data_ptr()
    del b
    assert pool.take((2, 3), np.float32).ctypes.data != b_address  # neither a (held) nor b (in the tensor)
    del a
    reused = pool.take((2, 3), np.float32)  # a was released: reused, b still is not
    assert reused.ctypes.data != b_address
    del reused, tensor
    addresses = {pool.take((2, 3), np.float32).ctypes.data for _ in range(3)}
    assert len(addresses) == 1  # nothing held: the same array every time
    assert pool.take((4,), np.uint8).shape == (4,) and pool.take((2, 3), np.float64).dtype == np.float64

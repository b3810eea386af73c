"""Training augmentation and test-time crops of the paper, on batched uint8 tensors.

Krizhevsky et al. 2012, section 4.1, defined once for Ray Data, training and tests alike:

- training: a random 224x224 patch of each 256x256 image (every one of the 33x33 offsets equally likely)
  and its horizontal reflection with probability 1/2; PCA colour ("lighting") noise; then the mean image
  (the paper, section 2) or a per-channel mean/std is subtracted;
- pixel scale: the paper's net sees raw 0-255 RGB minus the mean image (``pixel_scale=255``: its LRN constant
  k=2, alpha=1e-4 and its N(0, 0.01) init assume that unit); ``pixel_scale=1`` feeds pixels in [0, 1], as
  torchvision's weights expect. Statistics are always given on [0, 1] (``stats.json``) and scaled here;
- test: the centre patch, or the ten patches (four corners and the centre, each also reflected) whose
  softmax outputs are averaged (:func:`predict_ten_crop`).

Inputs are ``[N, 3, H, W]`` uint8 tensors (256x256 as the prepared dataset stores them) on any device;
everything is batched tensor code that runs where the tensor is (GPU when present), no PIL. Outputs are
float32 ``[N, 3, 224, 224]`` (``[N, 10, 3, 224, 224]`` for ten crops).

Randomness comes only from an explicit ``torch.Generator``: :meth:`Augmentation.sample_train_params`
draws the crop offsets, flips and lighting coefficients (on the generator's device) and
:meth:`Augmentation.apply_train` applies them, so a run is reproducible and tests can recompute by hand.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

__all__ = [
    "IMAGENET_MEAN_RGB",
    "IMAGENET_STD_RGB",
    "IMAGENET_PCA_EIGVAL",
    "IMAGENET_PCA_EIGVEC",
    "Augmentation",
    "BufferPool",
    "TrainParams",
    "predict_ten_crop",
    "ten_crop_offsets",
]

Normalize = Literal["mean_image", "channel"]
PIXEL_SCALES = (1, 255)

# fb.resnet.torch (datasets/imagenet.lua), pixels scaled to [0, 1]: per-channel ImageNet mean and std (the
# values torchvision uses too) and the PCA of the RGB covariance, eigenvalues descending, eigenvectors as
# the *columns* of IMAGENET_PCA_EIGVEC (the stats.json convention). For when no stats.json is available;
# a dataset's own stats are preferable.
IMAGENET_MEAN_RGB: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB: tuple[float, float, float] = (0.229, 0.224, 0.225)
IMAGENET_PCA_EIGVAL: tuple[float, float, float] = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC: tuple[tuple[float, float, float], ...] = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class BufferPool:
    """Output arrays that are reused once nothing refers to them any more, instead of fresh allocations.

    A fresh array of a batch (77 MB of float32 for 128 patches of 224x224, 25 MB of uint8 for 128 images of
    256x256) lies beyond malloc's mmap threshold, so every batch would come from new pages: the kernel zeroes
    them and takes a page fault per 4 KB, which cost as much as writing the pixels themselves (about 100 us per
    patch here). An array handed out (directly, or inside a tensor made by ``torch.from_numpy``, which keeps a
    reference to it, and any view of either) is only reused when Python's reference count says the pool holds the
    last reference, so a batch still in use is never overwritten. Thread-safe; at most ``keep`` arrays are kept.
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = max(1, keep)
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype`` that nobody else holds."""
        dtype = np.dtype(dtype)
        with self._lock:
            arrays = self._arrays
            for i in range(len(arrays)):
                # 2: the list's reference and getrefcount's argument; any user (tensor, view) adds its own
                if sys.getrefcount(arrays[i]) == 2 and arrays[i].shape == shape and arrays[i].dtype == dtype:
                    return arrays[i]
            array = np.empty(shape, dtype)
            if len(arrays) >= self.keep:
                # forget the oldest (in use, or of another shape): its users keep it alive as long as they need
                arrays.pop(0)
            arrays.append(array)
            return array


@dataclasses.dataclass(frozen=True, eq=False)
class TrainParams:
    """The random choices of one training batch of ``N`` images.

    ``top``/``left``: int64 ``[N]`` crop offsets in ``[0, H - crop]`` / ``[0, W - crop]``;
    ``flip``: bool ``[N]``, reflect horizontally; ``alpha``: float32 ``[N, 3]``, the lighting coefficients
    ``a_i ~ N(0, lighting_std^2)``, already scaled by the std.
    """

    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor
    alpha: torch.Tensor

    def to(self, device: torch.device | str) -> TrainParams:
        return TrainParams(*(t.to(device) for t in (self.top, self.left, self.flip, self.alpha)))


def ten_crop_offsets(height: int, width: int, crop: int) -> list[tuple[int, int]]:
    """``(top, left)`` of the four corner patches and the centre one, in torchvision ``TenCrop`` order:
    top-left, top-right, bottom-left, bottom-right, centre."""
    bottom, right = height - crop, width - crop
    return [(0, 0), (0, right), (bottom, 0), (bottom, right), (bottom // 2, right // 2)]


def _as_float32(value: Any) -> torch.Tensor:
    """A float32 tensor from a tensor (any device, kept there), array or nested sequence."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.float32)
    return torch.as_tensor(np.asarray(value, dtype=np.float32))


def _as_float_tensor(value: Any, shape: Sequence[int], name: str) -> torch.Tensor:
    tensor = _as_float32(value)
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    return tensor


@dataclasses.dataclass(frozen=True, eq=False)
class Augmentation:
    """The paper's augmentation and test crops, with their statistics (all on pixels in [0, 1]).

    Attributes:
        mean_image: float32 ``[3, H, W]``, the training set's mean image; needed for
            ``normalize="mean_image"``.
        mean_rgb, std_rgb: float32 ``[3]``, per-channel mean and std, for ``normalize="channel"``.
        eigval: float32 ``[3]``, eigenvalues of the RGB covariance, descending.
        eigvec: float32 ``[3, 3]``, the matching eigenvectors as **columns**.
        normalize: ``"mean_image"`` subtracts the mean image (the paper, section 2: "subtracting the mean
            activity over the training set from each pixel"), cropped and flipped like each image;
            ``"channel"`` computes ``(x - mean_rgb) / std_rgb``.
        lighting_std: std of the lighting coefficients ``a_i`` (the paper's 0.1); 0 disables the noise.
        crop: side of the square patches (the paper's 224).
        pixel_scale: the network's pixel unit: 255 (raw 0-255 RGB, the paper) or 1 ([0, 1]). The mean image
            and the lighting noise are scaled with it; ``"channel"`` normalisation divides by the std, so the
            unit cancels out there and both scales give the same output.

    Build with :meth:`from_stats` (a ``stats.json`` mapping and ``mean_image.npy``) or
    :meth:`imagenet_default`. Call :meth:`to` once with the training device so the statistics are not
    copied to it for every batch (they follow the input's device either way).
    """

    mean_rgb: torch.Tensor
    std_rgb: torch.Tensor
    eigval: torch.Tensor
    eigvec: torch.Tensor
    mean_image: torch.Tensor | None = None
    normalize: Normalize = "mean_image"
    lighting_std: float = 0.1
    crop: int = 224
    pixel_scale: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean_rgb", _as_float_tensor(self.mean_rgb, (3,), "mean_rgb"))
        object.__setattr__(self, "std_rgb", _as_float_tensor(self.std_rgb, (3,), "std_rgb"))
        object.__setattr__(self, "eigval", _as_float_tensor(self.eigval, (3,), "eigval"))
        object.__setattr__(self, "eigvec", _as_float_tensor(self.eigvec, (3, 3), "eigvec"))
        if self.mean_image is not None:
            mean_image = _as_float32(self.mean_image)
            if mean_image.ndim != 3 or mean_image.shape[0] != 3:
                raise ValueError(f"mean_image must be [3, H, W], got {tuple(mean_image.shape)}")
            object.__setattr__(self, "mean_image", mean_image)
        if self.normalize not in ("mean_image", "channel"):
            raise ValueError(f"normalize must be 'mean_image' or 'channel', got {self.normalize!r}")
        if self.normalize == "mean_image" and self.mean_image is None:
            raise ValueError("normalize='mean_image' needs a mean_image")
        if bool((self.std_rgb <= 0).any()):
            raise ValueError(f"std_rgb must be positive, got {self.std_rgb.tolist()}")
        if bool((self.eigval[:-1] < self.eigval[1:]).any()):
            raise ValueError(f"eigval must be in descending order, got {self.eigval.tolist()}")
        if self.lighting_std < 0:
            raise ValueError(f"lighting_std must be >= 0, got {self.lighting_std}")
        if self.crop < 1:
            raise ValueError(f"crop must be >= 1, got {self.crop}")
        if self.pixel_scale not in PIXEL_SCALES:
            raise ValueError(f"pixel_scale must be 255 (the paper's 0-255 pixels) or 1 ([0, 1]), "
                             f"got {self.pixel_scale!r}")
        if bool((self.eigval < 0).any()):
            raise ValueError(f"eigval are variances and must be >= 0, got {self.eigval.tolist()}")
        # Derived once (and again by `to`, which re-runs this): the statistics in the network's pixel unit.
        scaled_mean = None if self.mean_image is None else self.mean_image * self.pixel_scale
        object.__setattr__(self, "_scaled_mean_image", scaled_mean)
        object.__setattr__(self, "_lighting_stdevs", self.eigval.sqrt() * self.pixel_scale)
        # The CPU path's constants: the scaled mean image and its reflection as NumPy arrays (the reflection once,
        # so a flipped patch subtracts a positively strided crop of it), and the pool its outputs come from.
        cpu_means = None
        if scaled_mean is not None and scaled_mean.device.type == "cpu":
            mean_np = scaled_mean.numpy()
            cpu_means = (mean_np, np.ascontiguousarray(mean_np[:, :, ::-1]))
        object.__setattr__(self, "_cpu_means", cpu_means)
        object.__setattr__(self, "_out_pool", BufferPool(keep=3))

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def from_stats(
        cls,
        stats: Mapping[str, Any],
        mean_image: np.ndarray | torch.Tensor | None = None,
        *,
        normalize: Normalize = "mean_image",
        lighting_std: float = 0.1,
        crop: int = 224,
        pixel_scale: int = 1,
    ) -> Augmentation:
        """From the parsed ``stats.json`` (``mean_rgb``, ``std_rgb``, ``eigval``, ``eigvec`` with columns the
        eigenvectors; other keys are ignored) and the contents of ``mean_image.npy``."""
        missing = {"mean_rgb", "std_rgb", "eigval", "eigvec"} - set(stats)
        if missing:
            raise ValueError(f"stats lacks {sorted(missing)}")
        return cls(
            mean_rgb=stats["mean_rgb"],
            std_rgb=stats["std_rgb"],
            eigval=stats["eigval"],
            eigvec=stats["eigvec"],
            mean_image=mean_image,
            normalize=normalize,
            lighting_std=lighting_std,
            crop=crop,
            pixel_scale=pixel_scale,
        )

    @classmethod
    def imagenet_default(
        cls,
        mean_image: np.ndarray | torch.Tensor | None = None,
        *,
        normalize: Normalize = "channel",
        lighting_std: float = 0.1,
        crop: int = 224,
        pixel_scale: int = 1,
    ) -> Augmentation:
        """fb.resnet.torch's ImageNet constants, for when the dataset's stats are absent."""
        return cls(
            mean_rgb=IMAGENET_MEAN_RGB,
            std_rgb=IMAGENET_STD_RGB,
            eigval=IMAGENET_PCA_EIGVAL,
            eigvec=IMAGENET_PCA_EIGVEC,
            mean_image=mean_image,
            normalize=normalize,
            lighting_std=lighting_std,
            crop=crop,
            pixel_scale=pixel_scale,
        )

    def to(self, device: torch.device | str) -> Augmentation:
        """A copy with the statistics on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    # -- training ------------------------------------------------------------------------------------

    def sample_train_params(
        self, n: int, generator: torch.Generator | None, *, height: int = 256, width: int = 256
    ) -> TrainParams:
        """Draw the random choices for ``n`` images of ``height x width``, on the generator's device.

        Offsets are uniform over all ``(H - crop + 1) x (W - crop + 1)`` positions (33 x 33 for 256 and 224),
        flips are Bernoulli(1/2), lighting coefficients N(0, lighting_std^2), one triple per image.
        Draw order (top, left, flip, alpha) is fixed, so a seeded generator reproduces a batch.
        """
        if height < self.crop or width < self.crop:
            raise ValueError(f"images of {height}x{width} are smaller than the {self.crop} crop")
        device = generator.device if generator is not None else torch.device("cpu")
        top = torch.randint(0, height - self.crop + 1, (n,), generator=generator, device=device)
        left = torch.randint(0, width - self.crop + 1, (n,), generator=generator, device=device)
        flip = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
        alpha = torch.randn((n, 3), generator=generator, device=device) * self.lighting_std
        return TrainParams(top=top, left=left, flip=flip, alpha=alpha)

    def apply_train(self, x: torch.Tensor, params: TrainParams) -> torch.Tensor:
        """Crop, flip, light and normalise a uint8 batch ``[N, 3, H, W]`` with the given choices.

        Subtracting a (cropped, flipped) mean image commutes with cropping and flipping, so the mean image
        is cropped and flipped like the pixels: ``flip(crop(x)) - flip(crop(M)) == flip(crop(x - M))``, the
        paper's "mean image subtracted, then patch taken". Cropping the uint8 pixels first keeps the float work
        at 224x224.

        Two equivalent implementations: on accelerators one gather for the whole batch (a few kernels whatever
        ``N``); on the CPU a loop of per-image slices, about 3x cheaper there than the gather
        (``benchmarks/train_input.py``). ``tests/test_augment.py`` checks they agree.
        """
        n, _, _, _ = self._check_input(x)
        params = params.to(x.device)
        if params.top.shape != (n,):
            raise ValueError(f"params are for {params.top.shape[0]} images, the batch has {n}")
        if x.device.type == "cpu":
            return self._apply_train_sliced(x, params)
        return self._apply_train_gathered(x, params)

    def _apply_train_gathered(self, x: torch.Tensor, params: TrainParams) -> torch.Tensor:
        n, channels, height, width = x.shape
        size = self.crop
        steps = torch.arange(size, device=x.device)
        rows = params.top[:, None] + steps  # [N, crop]
        cols = params.left[:, None] + torch.where(params.flip[:, None], size - 1 - steps, steps)  # [N, crop]
        # One flat pixel index per output position, shared by the three channels and by the mean image.
        index = (rows[:, :, None] * width + cols[:, None, :]).reshape(n, 1, size * size)
        index = index.expand(n, channels, size * size)
        pixels = x.reshape(n, channels, height * width).gather(2, index).reshape(n, channels, size, size)
        out = pixels.to(torch.float32).mul_(self.pixel_scale / 255.0)
        out += self.lighting_offsets(params.alpha)[:, :, None, None]
        if self.normalize == "mean_image":
            mean_image = self._stat(self._scaled_mean_image, x.device).reshape(1, channels, height * width)
            out -= mean_image.expand(n, -1, -1).gather(2, index).reshape(n, channels, size, size)
            return out
        return self._normalize_channels(out)

    def _apply_train_sliced(self, x: torch.Tensor, params: TrainParams) -> torch.Tensor:
        # NumPy, one image at a time, each step on one patch that stays in the core's cache (150 KB of uint8,
        # 600 KB of float32): single-threaded, no per-op dispatch cost. Batch-wide ops would each stream the 77 MB
        # float batch through memory (measured slower); the loop itself costs a few microseconds per image.
        # Per patch: one strided uint8 copy with the crop and the flip fused into it (any input strides: NCHW or
        # channels-last), one exact uint8 -> float32 conversion into the output, then the scale, the lighting
        # offset and the mean image (a flipped patch takes its mean from the reflected mean image, a positively
        # strided crop: the same numbers as reflecting the crop) in place. The float32 arithmetic and its order
        # are those of the previous implementation, ((x * s) + offset) - mean, so the result is bitwise the same
        # (tests/test_augment.py compares them). The output array is reused once its tensor is dropped
        # (BufferPool: no fresh pages per batch).
        n, channels, _, width = x.shape
        size = self.crop
        pixels = x.numpy()
        out = self._out_pool.take((n, channels, size, size), np.float32)
        offsets = self.lighting_offsets(params.alpha).numpy()[:, :, None, None]
        means = None
        if self.normalize == "mean_image":
            means = self._cpu_means
            if means is None:  # statistics moved to another device than the input's: convert once per call
                mean_np = self._stat(self._scaled_mean_image, x.device).numpy()
                means = (mean_np, np.ascontiguousarray(mean_np[:, :, ::-1]))
        scale = np.float32(self.pixel_scale / 255.0)
        scratch = np.empty((channels, size, size), np.uint8)
        for i, (top, left, flip) in enumerate(zip(params.top.tolist(), params.left.tolist(), params.flip.tolist())):
            rows = slice(top, top + size)
            src = pixels[i, :, rows, left : left + size]
            np.copyto(scratch, src[:, :, ::-1] if flip else src)
            patch = out[i]
            np.copyto(patch, scratch)  # exact: every uint8 is a float32
            patch *= scale
            patch += offsets[i]
            if means is not None:
                mean, mirrored = means
                if flip:  # reflect(M[:, rows, l:l+s]) == reflect(M)[:, rows, W-l-s:W-l]
                    patch -= mirrored[:, rows, width - left - size : width - left]
                else:
                    patch -= mean[:, rows, left : left + size]
        result = torch.from_numpy(out)
        return result if means is not None else self._normalize_channels(result)

    def crop_flip(self, x: torch.Tensor, params: TrainParams) -> torch.Tensor:
        """Only the random crop and flip of :meth:`apply_train`, on uint8: ``[N, 3, crop, crop]`` uint8 (CPU: one
        strided copy per patch into a reused buffer; elsewhere the same slicing batched), e.g. to send 224x224
        patches to the device, which then lights and normalises them. The pixels are those
        :meth:`apply_train` starts from."""
        n, channels, _, _ = self._check_input(x)
        params = params.to(x.device)
        size = self.crop
        if x.device.type != "cpu":
            steps = torch.arange(size, device=x.device)
            rows = (params.top[:, None] + steps)[:, None, :, None]
            cols = params.left[:, None] + torch.where(params.flip[:, None], size - 1 - steps, steps)
            batch = torch.arange(n, device=x.device)[:, None, None, None]
            return x[batch, torch.arange(channels, device=x.device)[None, :, None, None], rows, cols[:, None, None, :]]
        pixels = x.numpy()
        out = self._out_pool.take((n, channels, size, size), np.uint8)
        for i, (top, left, flip) in enumerate(zip(params.top.tolist(), params.left.tolist(), params.flip.tolist())):
            src = pixels[i, :, top : top + size, left : left + size]
            np.copyto(out[i], src[:, :, ::-1] if flip else src)
        return torch.from_numpy(out)

    def train(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Random crop, flip, PCA lighting and normalisation of a uint8 batch -> float32 ``[N, 3, crop, crop]``."""
        n, _, height, width = self._check_input(x)
        return self.apply_train(x, self.sample_train_params(n, generator, height=height, width=width))

    def lighting_offsets(self, alpha: torch.Tensor) -> torch.Tensor:
        """The paper's PCA lighting, per image: ``[p1 p2 p3] [a1 l1, a2 l2, a3 l3]^T`` -> ``[N, 3]`` RGB offsets,
        in the network's pixel unit.

        ``p_i`` are the columns of ``eigvec``, ``alpha`` ``[N, 3]`` the ``a_i``, and ``l_i`` is read as
        cuda-convnet2 (the paper's own code) reads it: its ``color_stdevs``, the standard deviation of the pixels
        along ``p_i``, ``sqrt(eigval_i)``, times ``pixel_scale``. That is the one reading that does not depend on
        the unit (a variance scales with its square: the literal eigenvalue of the 0-255 covariance, several
        thousand, would add noise of hundreds of grey levels). The offsets' covariance is
        ``eigvec @ diag(lighting_std^2 * eigval * pixel_scale^2) @ eigvec.T``: on ImageNet (top eigenvalue about
        0.107 on [0, 1], 6,927 on 0-255) and ``lighting_std=0.1``, about 8.3 grey levels along ``p1``.
        """
        stdevs = self._stat(self._lighting_stdevs, alpha.device)
        eigvec = self._stat(self.eigvec, alpha.device)
        return (alpha * stdevs) @ eigvec.T

    # -- evaluation ----------------------------------------------------------------------------------

    def eval_center(self, x: torch.Tensor) -> torch.Tensor:
        """The central ``crop x crop`` patch, normalised -> float32 ``[N, 3, crop, crop]``."""
        _, _, height, width = self._check_input(x)
        top, left = (height - self.crop) // 2, (width - self.crop) // 2
        return self._normalized_patch(x, top, left)

    def iter_ten_crops(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """The ten test patches of section 4.1, one ``[N, 3, crop, crop]`` batch at a time: top-left,
        top-right, bottom-left, bottom-right, centre, then the same five reflected."""
        _, _, height, width = self._check_input(x)
        patches = [self._normalized_patch(x, top, left) for top, left in ten_crop_offsets(height, width, self.crop)]
        yield from patches
        # Reflecting a normalised patch equals normalising the reflected patch with the reflected mean.
        for patch in patches:
            yield patch.flip(-1)

    def eval_ten_crop(self, x: torch.Tensor) -> torch.Tensor:
        """All ten patches at once -> float32 ``[N, 10, 3, crop, crop]`` (order of :meth:`iter_ten_crops`)."""
        return torch.stack(list(self.iter_ten_crops(x)), dim=1)

    # -- helpers -------------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        if x.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 batch, got {x.dtype}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected [N, 3, H, W], got {tuple(x.shape)}")
        n, channels, height, width = x.shape
        if height < self.crop or width < self.crop:
            raise ValueError(f"images of {height}x{width} are smaller than the {self.crop} crop")
        if self.normalize == "mean_image" and self.mean_image is not None:
            if tuple(self.mean_image.shape) != (channels, height, width):
                raise ValueError(
                    f"mean image is {tuple(self.mean_image.shape)}, images are {(channels, height, width)}"
                )
        return n, channels, height, width

    @staticmethod
    def _stat(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        assert tensor is not None
        return tensor.to(device, non_blocking=True)

    def _normalize_channels(self, out: torch.Tensor) -> torch.Tensor:
        mean = self._stat(self.mean_rgb, out.device)[:, None, None] * self.pixel_scale
        std = self._stat(self.std_rgb, out.device)[:, None, None] * self.pixel_scale
        return out.sub_(mean).div_(std)

    def _normalized_patch(self, x: torch.Tensor, top: int, left: int) -> torch.Tensor:
        rows, cols = slice(top, top + self.crop), slice(left, left + self.crop)
        out = x[:, :, rows, cols].to(torch.float32).mul_(self.pixel_scale / 255.0)
        if self.normalize == "mean_image":
            return out.sub_(self._stat(self._scaled_mean_image, x.device)[:, rows, cols])
        return self._normalize_channels(out)


@torch.inference_mode()
def predict_ten_crop(model: nn.Module, x: torch.Tensor, augmentation: Augmentation) -> torch.Tensor:
    """Section 4.1's test-time prediction: the softmax averaged over the ten patches -> ``[N, C]`` float32.

    ``x`` is a uint8 batch ``[N, 3, H, W]`` on the model's device. The model must be in eval mode (dropout
    off). Runs one forward pass per patch of ``N`` images, so memory is that of a centre-crop evaluation.
    """
    if model.training:
        raise ValueError("predict_ten_crop needs model.eval(): dropout would be active")
    total: torch.Tensor | None = None
    for patch in augmentation.iter_ten_crops(x):
        probs = model(patch).float().softmax(dim=-1)
        total = probs if total is None else total.add_(probs)
    assert total is not None
    return total.div_(10.0)

"""The paper's Figure 1: a four-layer convolutional network on CIFAR-10, with ReLUs and with tanh units.

Krizhevsky et al. 2012, section 3.1 and Figure 1: "A four-layer convolutional neural network with ReLUs (solid
line) reaches a 25% training error rate on CIFAR-10 six times faster than an equivalent network with tanh neurons
(dashed line). The learning rates for each network were chosen independently to make training as fast as
possible. No regularization of any kind was employed."

The paper does not give the network. ``CifarNet`` is the network of cuda-convnet's ``layers-80sec.cfg`` (the
paper's own code, its "26% error on CIFAR-10 in 80 seconds" example) without its 64-unit hidden fully-connected
layer, so that it has four layers with weights, three convolutional and one fully connected::

    conv1 32 5x5 pad 2 -> max pool 3/2 -> f      [N, 32, 16, 16]
    conv2 32 5x5 pad 2 -> f -> avg pool 3/2      [N, 32, 8, 8]
    conv3 64 5x5 pad 2 -> f -> avg pool 3/2      [N, 64, 4, 4]
    fc10                                          [N, 10]

with ``f`` ReLU or tanh, cuda-convnet's pooling (windows may run over the border: ``ceil_mode``) and its
initialisation (``initW``: N(0, 1e-4) for conv1, N(0, 0.01) for conv2 and conv3, N(0, 0.1) for fc10; biases 0).
The input is raw 0-255 RGB minus the training set's mean image, as cuda-convnet's CIFAR data provider feeds it.
Training: SGD with momentum 0.9, batch 128, no weight decay, dropout or augmentation; the training error of an
epoch is the running error over its minibatches (what cuda-convnet prints, and what Figure 1 plots).

CIFAR-10 comes from its official python tarball ``cifar-10-python.tar.gz`` (or the extracted
``cifar-10-batches-py`` folder): ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``, pickled
dicts with ``b'data'`` (uint8 N x 3072, channel-major 32x32 planes) and ``b'labels'``. They are read by a restricted
unpickler that builds only dicts, lists, bytes, numbers and numpy arrays: its ``find_class`` allows exactly
``numpy.core.multiarray._reconstruct`` (also under numpy 2's name ``numpy._core.multiarray``), ``numpy.ndarray`` and
``numpy.dtype``, and refuses every other global, so no code in a file is run.
"""

from __future__ import annotations

import io
import logging
import pickle
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

TARBALL = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
ACTIVATIONS = ("relu", "tanh")

# --- reading the official batches without running code -------------------------------------------------------------


def _allowed_globals() -> dict[tuple[str, str], Any]:
    from numpy._core.multiarray import _reconstruct

    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # the official files (Python 2, numpy 1)
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # the same function, pickled by numpy 2
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _BatchUnpickler(pickle.Unpickler):
    """Builds containers, numbers, bytes and numpy arrays; any other global is refused (nothing is imported)."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: a CIFAR-10 batch holds only dicts, "
                                         "lists, bytes, numbers and numpy arrays") from None


def load_batch(fileobj: IO[bytes], name: str = "batch") -> dict[bytes, Any]:
    """One pickled CIFAR-10 batch (Python 2 pickles: keys and strings come back as ``bytes``)."""
    try:
        batch = _BatchUnpickler(fileobj, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{name}: not a CIFAR-10 python batch ({e})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{name}: expected a pickled dict, got {type(batch).__name__}")
    return batch


@dataclass
class Cifar10:
    train_images: np.ndarray  # uint8 [50000, 3, 32, 32]
    train_labels: np.ndarray  # int64 [50000]
    test_images: np.ndarray
    test_labels: np.ndarray
    label_names: list[str]


def _images(batch: dict[bytes, Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    for key in (b"data", b"labels"):
        if key not in batch:
            raise ValueError(f"{name}: no {key!r} entry (keys: {sorted(batch)})")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(f"{name}: b'data' should be uint8 [N, 3072] with N labels, got {data.dtype} {data.shape} "
                         f"and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(path: str | Path) -> Cifar10:
    """CIFAR-10 from ``cifar-10-python.tar.gz``, a folder holding it, or the extracted ``cifar-10-batches-py``
    (or its parent folder). The tarball is read in place, member by member, never extracted."""
    path = Path(path)
    if path.is_dir() and (path / TARBALL).is_file() and not (path / FOLDER).is_dir():
        path = path / TARBALL
    names = (*TRAIN_BATCHES, TEST_BATCH, META)
    if path.is_file():
        with tarfile.open(path, "r:*") as tar:
            members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers()
                       if m.isfile() and m.name.startswith(f"{FOLDER}/")}
            missing = [n for n in names if n not in members]
            if missing:
                raise ValueError(f"{path}: no {FOLDER}/{missing[0]} inside; expected the official {TARBALL}")
            batches = {n: load_batch(io.BytesIO(tar.extractfile(members[n]).read()), f"{path}:{n}") for n in names}
    elif path.is_dir():
        folder = path if (path / META).is_file() else path / FOLDER
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder / missing[0]} not found: pass {TARBALL} or the {FOLDER} folder")
        batches = {}
        for n in names:
            with open(folder / n, "rb") as f:
                batches[n] = load_batch(f, str(folder / n))
    else:
        raise FileNotFoundError(f"{path} not found: pass the official {TARBALL} or its extracted {FOLDER} folder")
    train = [_images(batches[n], n) for n in TRAIN_BATCHES]
    test_images, test_labels = _images(batches[TEST_BATCH], TEST_BATCH)
    names_ = [n.decode() if isinstance(n, bytes) else str(n) for n in batches[META].get(b"label_names", [])]
    return Cifar10(np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
                   test_images, test_labels, names_)


# --- the network ---------------------------------------------------------------------------------------------------


class CifarNet(nn.Module):
    """The four-layer CIFAR-10 network of Figure 1 (module docstring), with ``activation`` "relu" or "tanh"."""

    def __init__(self, activation: str = "relu", num_classes: int = 10) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, not {activation!r}")
        self.activation = activation
        self.conv1 = nn.Conv2d(3, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 32, 5, padding=2)
        self.conv3 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc = nn.Linear(64 * 4 * 4, num_classes)
        for layer, std in ((self.conv1, 1e-4), (self.conv2, 0.01), (self.conv3, 0.01), (self.fc, 0.1)):
            nn.init.normal_(layer.weight, 0.0, std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu if self.activation == "relu" else torch.tanh
        x = f(F.max_pool2d(self.conv1(x), 3, 2, ceil_mode=True))  # [N, 32, 16, 16]
        x = F.avg_pool2d(f(self.conv2(x)), 3, 2, ceil_mode=True)  # [N, 32, 8, 8]
        x = F.avg_pool2d(f(self.conv3(x)), 3, 2, ceil_mode=True)  # [N, 64, 4, 4]
        return self.fc(x.flatten(1))


# --- training to a target error ------------------------------------------------------------------------------------


def train_to_error(images: np.ndarray, labels: np.ndarray, *, activation: str, lr: float, target: float = 0.25,
                   max_epochs: int = 100, batch_size: int = 128, momentum: float = 0.9, seed: int = 0,
                   device: str | None = None) -> dict[str, Any]:
    """Train ``CifarNet(activation)`` on uint8 ``images`` [N, 3, 32, 32] until an epoch's training error is at most
    ``target`` or ``max_epochs`` pass. Returns the per-epoch training errors and the epoch that reached ``target``
    (None when none did)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    model = CifarNet(activation).to(dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    x_all = torch.from_numpy(images).to(dev)
    y_all = torch.from_numpy(labels).to(dev)
    mean = x_all.float().mean(0, keepdim=True)  # the mean image, in 0-255 units
    order_rng = torch.Generator().manual_seed(seed)
    errors, reached, started = [], None, time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        model.train()
        wrong, seen = 0, 0
        for idx in torch.randperm(len(images), generator=order_rng).split(batch_size):
            idx = idx.to(dev)
            logits = model(x_all[idx].float() - mean)
            loss = F.cross_entropy(logits, y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            wrong += int((logits.detach().argmax(1) != y_all[idx]).sum())
            seen += len(idx)
        errors.append(wrong / seen)
        log.info("%s epoch %d: training error %.4f", activation, epoch, errors[-1])
        if not np.isfinite(float(loss.detach())):
            raise RuntimeError(f"{activation}: the loss diverged at epoch {epoch} with lr {lr}; lower its lr")
        if errors[-1] <= target:
            reached = epoch
            break
    return {"activation": activation, "lr": lr, "train_error": errors, "epoch_reached": reached,
            "seconds": round(time.perf_counter() - started, 2)}


def relu_vs_tanh(data: str | Path, *, lr_relu: float = 0.001, lr_tanh: float = 0.001, target: float = 0.25,
                 max_epochs: int = 100, batch_size: int = 128, seed: int = 0, device: str | None = None,
                 ) -> dict[str, Any]:
    """Figure 1's experiment: train the ReLU and the tanh network on CIFAR-10's training set to ``target``
    training error; returns both runs, the epoch each reached it and their ratio (the paper: about 6).

    The default rates are cuda-convnet's ``layer-params-80sec.cfg`` (``epsW=0.001``, per mean gradient); the paper
    chose each network's rate to train it fastest, which ``lr_relu`` and ``lr_tanh`` are for."""
    cifar = load_cifar10(data)
    runs = {a: train_to_error(cifar.train_images, cifar.train_labels, activation=a,
                              lr=lr_relu if a == "relu" else lr_tanh, target=target, max_epochs=max_epochs,
                              batch_size=batch_size, seed=seed, device=device) for a in ACTIVATIONS}
    relu, tanh = runs["relu"]["epoch_reached"], runs["tanh"]["epoch_reached"]
    return {"runs": runs, "target": target, "max_epochs": max_epochs, "train_images": len(cifar.train_labels),
            "epochs_to_target": {"relu": relu, "tanh": tanh},
            "ratio": (tanh / relu) if relu and tanh else None, "paper_ratio": 6.0, "data": str(data)}

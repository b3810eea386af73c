"""AlexNet networks: the NIPS 2012 paper's and torchvision's.

Three variants, built by :func:`build_model`:

``variant="paper"``
    Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep Convolutional Neural Networks",
    NIPS 2012, section 3 (figure 2): five convolutional and three fully-connected layers, ReLU
    everywhere (3.1), the two-GPU split (3.2) written as one column with ``groups=2`` in conv2, conv4 and
    conv5, local response normalisation (3.3) and overlapping max-pooling (3.4), dropout in the first
    two fully-connected layers (4.2). 60,965,224 parameters with 1000 classes. The ablation switches
    ``lrn``, ``overlap_pool``, ``dropout`` and ``activation`` (tanh, for figure 1) turn each of those choices
    off in turn, to measure the effects the paper reports.

``variant="one-gpu"``
    The baseline of the paper's two-GPU comparison (section 3.2, -1.7% / -1.2%): "a net with half as many
    kernels in each convolutional layer trained on one GPU", one tower with no groups: 48-128-192-192 kernels
    in conv1-conv4. Its footnote 2 keeps the final convolutional layer at 256 kernels "(nor the
    fully-connected layers which follow)", since most parameters sit in fc6, so conv5 has 256 and fc6/fc7
    4096 units: 59,798,312 parameters with 1000 classes, against 60,965,224 (the paper: "approximately the same
    number of parameters", the comparison "biased in favor of the one-GPU net"). ``groups`` does not apply.

``variant="torchvision"``
    The single-column network of Krizhevsky, "One weird trick for parallelizing convolutional neural
    networks" (2014), as ``torchvision.models.alexnet`` ships it (64-192-384-256-256 kernels, no LRN,
    an adaptive average pool to 6x6), 61,100,840 parameters. Its ``state_dict`` keys and shapes are
    torchvision's, so torchvision's weights load into it unchanged.

Both are :class:`AlexNet` modules with ``features`` (convolutions and pools), ``avgpool`` and
``classifier`` (fully-connected layers) in torchvision's layout. Activations of a named layer (``conv1`` ...
``conv5``, ``pool5``, ``fc6``, ``fc7``, ``fc8``) come from :meth:`AlexNet.forward_features`, or from a
forward hook on ``model.get_submodule(model.tap_points[name])``: for ``conv*``, ``fc6`` and ``fc7`` that
module is the ReLU after the layer, so the hook sees post-ReLU activations (``fc8`` gives the logits).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AlexNet",
    "LocalResponseNorm",
    "build_model",
    "count_parameters",
    "init_paper_",
    "init_kaiming_",
    "init_caffe_",
]

Variant = Literal["paper", "one-gpu", "torchvision"]
Activation = Literal["relu", "tanh"]
Init = Literal["paper", "kaiming", "caffe"]
LayerName = Literal["conv1", "conv2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7", "fc8"]


class LocalResponseNorm(nn.Module):
    """Local response normalisation across channels, exactly as written in section 3.3 of the paper.

    ``b[i] = a[i] / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a[j]^2) ** beta``

    with ``n/2`` rounded down (the sum runs over ``2*(n//2) + 1`` channels centred on ``i``, cut at the
    first and last channel) and the paper's constants ``k=2, n=5, alpha=1e-4, beta=0.75`` as defaults.

    ``torch.nn.LocalResponseNorm`` (like Caffe's LRN layer) multiplies the *mean* of the squares by
    alpha, i.e. divides alpha by the window size; the paper (and TensorFlow) multiply the *sum*. We call
    torch's kernel with ``alpha * window`` so the result is the paper's formula; torch zero-pads the
    channel window at both ends, which is the same as cutting the sum at the edges.
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.alpha = alpha
        self.beta = beta
        self.k = k

    @property
    def window(self) -> int:
        """Number of channels summed: ``i - n//2 .. i + n//2``."""
        return 2 * (self.size // 2) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.local_response_norm(x, self.window, alpha=self.alpha * self.window, beta=self.beta, k=self.k)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k} (paper's alpha, not divided by n)"


class AlexNet(nn.Module):
    """An AlexNet: ``features`` -> ``avgpool`` -> flatten -> ``classifier``.

    Built by :func:`build_model`; the constructor takes the already-built parts. ``tap_points`` maps the
    layer names ``conv1`` .. ``conv5``, ``pool5``, ``fc6``, ``fc7``, ``fc8`` to the dotted path of the
    module whose output is that layer's activation (the ReLU after a conv/fc layer, the last pool for
    ``pool5``, the last linear layer for ``fc8``). Paths, not module objects, so replacing a module (a new
    ``fc8`` for transfer learning, say) keeps the taps valid as long as the path is kept.
    """

    def __init__(
        self,
        features: nn.Sequential,
        avgpool: nn.Module,
        classifier: nn.Sequential,
        tap_points: dict[str, str],
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = avgpool
        self.classifier = classifier
        self.tap_points: dict[str, str] = dict(tap_points)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # [N, 256, 6, 6] for a 224x224 input
        x = self.avgpool(x)  # [N, 256, 6, 6]
        x = torch.flatten(x, 1)  # [N, 9216]
        return self.classifier(x)  # [N, num_classes] logits

    def forward_features(self, x: torch.Tensor, layer: LayerName = "fc7") -> torch.Tensor:
        """Run the network up to ``layer`` and return its activation.

        ``conv1`` .. ``conv5``, ``fc6``, ``fc7``: post-ReLU activations (before any LRN, pooling or
        dropout that follows); ``pool5``: the last max-pool's output ``[N, 256, 6, 6]``; ``fc8``: logits.
        Dropout is active only in training mode, as in ``forward``: call ``model.eval()`` for features.
        """
        return self.forward_taps(x, (layer,))[layer]

    def forward_taps(self, x: torch.Tensor, layers: Sequence[LayerName]) -> dict[str, torch.Tensor]:
        """The activations of several ``layers`` (see :meth:`forward_features`) from one forward pass that stops
        at the deepest of them. Each is a tensor of its own (a later in-place ReLU cannot change it)."""
        unknown = [name for name in layers if name not in self.tap_points]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}; choose from {sorted(self.tap_points)}")
        wanted = {id(self.get_submodule(self.tap_points[name])): name for name in layers}
        out: dict[str, torch.Tensor] = {}

        def visit(module: nn.Module, value: torch.Tensor) -> bool:
            name = wanted.get(id(module))
            if name is not None:
                out[name] = value.clone() if len(wanted) > 1 else value
            return len(out) == len(wanted)

        for module in self.features:
            x = module(x)
            if visit(module, x):
                return out
        x = self.avgpool(x)
        if visit(self.avgpool, x):
            return out
        x = torch.flatten(x, 1)
        for module in self.classifier:
            x = module(x)
            if visit(module, x):
                return out
        missing = sorted(set(wanted.values()) - set(out))
        raise RuntimeError(f"layer(s) {missing} are not on the forward path")


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


#: Kernels of conv1..conv5: the paper's two towers together, and its one-GPU net (footnote 2: conv5 not halved).
_PAPER_WIDTHS = (96, 256, 384, 384, 256)
_ONE_GPU_WIDTHS = (48, 128, 192, 192, 256)


def _paper_alexnet(
    *, num_classes: int, lrn: bool, overlap_pool: bool, groups: int, dropout: float,
    widths: tuple[int, int, int, int, int] = _PAPER_WIDTHS, activation: Activation = "relu",
) -> AlexNet:
    """Section 3 of the paper, one column, the two GPUs' halves as convolution groups.

    ``widths`` are the kernels of conv1..conv5 (the one-GPU net's are narrower). ``activation="tanh"`` puts
    ``nn.Tanh`` where the ReLUs are; the modules keep their names (``relu1`` ...) so taps and state dicts do not
    change with the switch.

    Input 224x224. ``(224 - 11) / 4 + 1`` is not an integer, so the paper's 224 cannot give its 55x55
    conv1 map without padding (Caffe crops 227 instead). We keep the paper's 224 crops and pad conv1 by 2:
    ``floor((224 + 2*2 - 11) / 4) + 1 = 55``, as torchvision's conv1 does.

    Pooling: overlapping 3x3 stride 2 (section 3.4) or, with ``overlap_pool=False``, the paper's
    comparison scheme 2x2 stride 2 (s = z = 2). PyTorch's default floor mode makes 2/2 pooling give the same
    sizes, 55 -> 27, 27 -> 13, 13 -> 6 (dropping the last row and column of the odd-sized maps), so no
    padding, ceil mode or adaptive pool is needed to keep the 6x6x256 = 9216 input of fc6.

    Dropout: the paper drops the *outputs* of the two hidden fully-connected layers (section 4.2), so the
    order is fc6, relu6, drop6, fc7, relu7, drop7, fc8 (Caffe's ``bvlc_alexnet`` order too); torchvision
    puts its dropout before fc6 and fc7 instead.
    """
    pool_kernel = 3 if overlap_pool else 2

    def pool() -> nn.MaxPool2d:
        return nn.MaxPool2d(kernel_size=pool_kernel, stride=2)

    def norm() -> nn.Module:
        return LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0) if lrn else nn.Identity()

    def act() -> nn.Module:
        return nn.ReLU(inplace=True) if activation == "relu" else nn.Tanh()

    c1, c2, c3, c4, c5 = widths  # the paper's shapes below
    features = nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2)),  # [N, 96, 55, 55]
                ("relu1", act()),
                ("norm1", norm()),
                ("pool1", pool()),  # [N, 96, 27, 27]
                ("conv2", nn.Conv2d(c1, c2, kernel_size=5, padding=2, groups=groups)),  # [N, 256, 27, 27]
                ("relu2", act()),
                ("norm2", norm()),
                ("pool2", pool()),  # [N, 256, 13, 13]
                ("conv3", nn.Conv2d(c2, c3, kernel_size=3, padding=1)),  # [N, 384, 13, 13], sees both halves
                ("relu3", act()),
                ("conv4", nn.Conv2d(c3, c4, kernel_size=3, padding=1, groups=groups)),  # [N, 384, 13, 13]
                ("relu4", act()),
                ("conv5", nn.Conv2d(c4, c5, kernel_size=3, padding=1, groups=groups)),  # [N, 256, 13, 13]
                ("relu5", act()),
                ("pool5", pool()),  # [N, 256, 6, 6]
            ]
        )
    )
    classifier = nn.Sequential(
        OrderedDict(
            [
                ("fc6", nn.Linear(c5 * 6 * 6, 4096)),  # [N, 4096]
                ("relu6", act()),
                ("drop6", _dropout(dropout)),
                ("fc7", nn.Linear(4096, 4096)),  # [N, 4096]
                ("relu7", act()),
                ("drop7", _dropout(dropout)),
                ("fc8", nn.Linear(4096, num_classes)),  # [N, num_classes]
            ]
        )
    )
    taps = {f"conv{i}": f"features.relu{i}" for i in range(1, 6)}
    taps |= {"pool5": "features.pool5", "fc6": "classifier.relu6", "fc7": "classifier.relu7", "fc8": "classifier.fc8"}
    # The paper has no average pool: a 224x224 input gives 6x6 already, any other size is an error at fc6.
    return AlexNet(features, nn.Identity(), classifier, taps)


def _torchvision_alexnet(*, num_classes: int, dropout: float) -> AlexNet:
    """torchvision's ``alexnet`` (the "one weird trick" single-column net), key for key.

    Same module indices as ``torchvision/models/alexnet.py`` so ``load_state_dict`` accepts its weights;
    initialised like torchvision's, i.e. with PyTorch's default ``Conv2d``/``Linear`` initialisation.
    """
    features = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # 0: [N, 64, 55, 55]
        nn.ReLU(inplace=True),  # 1
        nn.MaxPool2d(kernel_size=3, stride=2),  # 2: [N, 64, 27, 27]
        nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 3: [N, 192, 27, 27]
        nn.ReLU(inplace=True),  # 4
        nn.MaxPool2d(kernel_size=3, stride=2),  # 5: [N, 192, 13, 13]
        nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 6: [N, 384, 13, 13]
        nn.ReLU(inplace=True),  # 7
        nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 8: [N, 256, 13, 13]
        nn.ReLU(inplace=True),  # 9
        nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 10: [N, 256, 13, 13]
        nn.ReLU(inplace=True),  # 11
        nn.MaxPool2d(kernel_size=3, stride=2),  # 12: [N, 256, 6, 6]
    )
    avgpool = nn.AdaptiveAvgPool2d((6, 6))  # [N, 256, 6, 6] whatever the input size
    classifier = nn.Sequential(
        nn.Dropout(p=dropout),  # 0 (kept even when p == 0 so the indices below stay torchvision's)
        nn.Linear(256 * 6 * 6, 4096),  # 1: fc6
        nn.ReLU(inplace=True),  # 2
        nn.Dropout(p=dropout),  # 3
        nn.Linear(4096, 4096),  # 4: fc7
        nn.ReLU(inplace=True),  # 5
        nn.Linear(4096, num_classes),  # 6: fc8
    )
    taps = {"conv1": "features.1", "conv2": "features.4", "conv3": "features.7", "conv4": "features.9"}
    taps |= {"conv5": "features.11", "pool5": "features.12", "fc6": "classifier.2", "fc7": "classifier.5"}
    taps |= {"fc8": "classifier.6"}
    return AlexNet(features, avgpool, classifier, taps)


def _named_layers(model: AlexNet) -> dict[str, nn.Conv2d | nn.Linear]:
    """``conv1`` .. ``fc8`` of a paper-variant model, in order."""
    names = ["conv1", "conv2", "conv3", "conv4", "conv5"]
    layers: dict[str, nn.Conv2d | nn.Linear] = {n: model.features.get_submodule(n) for n in names}
    layers |= {n: model.classifier.get_submodule(n) for n in ["fc6", "fc7", "fc8"]}
    return layers


# Layers whose bias the paper sets to 1 "to accelerate the early stages of learning by providing the ReLUs
# with positive inputs" (section 5); every other bias is 0.
_PAPER_BIAS_ONE = frozenset({"conv2", "conv4", "conv5", "fc6", "fc7"})


@torch.no_grad()
def init_paper_(model: AlexNet) -> None:
    """Section 5: every weight from N(0, 0.01^2); biases 1 in conv2, conv4, conv5, fc6, fc7, else 0.

    Known pitfall: with these biases and the fixed 0.01 std, the signal reaching fc8 barely depends on
    the input, and several reproductions sit at the chance loss ln(1000) ~ 6.91 for a long time or for
    good. ``init="caffe"`` or ``init="kaiming"`` avoid it.
    """
    for name, layer in _named_layers(model).items():
        nn.init.normal_(layer.weight, mean=0.0, std=0.01)
        nn.init.constant_(layer.bias, 1.0 if name in _PAPER_BIAS_ONE else 0.0)


@torch.no_grad()
def init_kaiming_(model: AlexNet) -> None:
    """He et al. 2015 ("Delving deep into rectifiers"): weights N(0, 2 / fan_in), all biases 0.

    A fixed std of 0.01 shrinks or grows the activations by a layer-dependent factor (the fan-in of
    conv1 is 363, of fc6 9216), so the paper's init only trains because of its positive biases and
    often not at all; Kaiming's std keeps the variance of the ReLU activations about constant through
    the eight layers, so logits depend on the input from the first step. ``fan_in`` mode (forward
    variance) on every conv and fc layer, the grouped layers' fan-in being per group.
    """
    for layer in _named_layers(model).values():
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(layer.bias)


@torch.no_grad()
def init_caffe_(model: AlexNet) -> None:
    """Caffe's ``models/bvlc_alexnet/train_val.prototxt``: weights N(0, 0.01^2), fc6 and fc7 N(0, 0.005^2);
    biases 0.1 where the paper has 1 (conv2, conv4, conv5, fc6, fc7), 0 elsewhere.

    Caffe lowered the biases from 1 to 0.1 because the paper's init left its training stuck at chance.
    """
    for name, layer in _named_layers(model).items():
        nn.init.normal_(layer.weight, mean=0.0, std=0.005 if name in ("fc6", "fc7") else 0.01)
        nn.init.constant_(layer.bias, 0.1 if name in _PAPER_BIAS_ONE else 0.0)


_INITS = {"paper": init_paper_, "kaiming": init_kaiming_, "caffe": init_caffe_}


def build_model(
    *,
    variant: Variant = "paper",
    num_classes: int = 1000,
    lrn: bool = True,
    overlap_pool: bool = True,
    groups: int = 2,
    dropout: float = 0.5,
    init: Init = "paper",
    activation: Activation = "relu",
) -> AlexNet:
    """Build an AlexNet.

    Args:
        variant: ``"paper"`` (Krizhevsky et al. 2012, section 3), ``"one-gpu"`` (the paper's one-GPU net with
            half the kernels, the baseline of its two-GPU comparison) or ``"torchvision"`` (the "one weird trick"
            single-column net of ``torchvision.models.alexnet``, loadable with its state dict).
        num_classes: outputs of fc8.
        lrn: paper variant only: local response normalisation after ReLU1 and ReLU2 (section 3.3);
            ``False`` drops it (the modules become ``nn.Identity``, keeping the layer names).
        overlap_pool: paper variant only: 3x3 stride-2 pooling (section 3.4) or, ``False``, 2x2 stride 2;
            both give 27, 13 and 6 (floor mode), see :func:`_paper_alexnet`.
        groups: paper variant only: 2 splits conv2, conv4 and conv5 into the two GPUs' halves (section
            3.2); 1 connects every kernel to every map of the previous layer, a bigger net (62,378,344
            parameters) that the paper never trained. It is *not* the paper's two-GPU ablation: that compares
            with a one-tower net of half the kernels, ``variant="one-gpu"`` (always one group).
        dropout: drop probability of the two hidden fully-connected layers' dropout (section 4.2);
            0 disables it.
        init: paper variants only: ``"paper"`` (:func:`init_paper_`), ``"kaiming"`` (:func:`init_kaiming_`)
            or ``"caffe"`` (:func:`init_caffe_`).
        activation: paper variants only: ``"relu"`` (section 3.1) or ``"tanh"`` (the saturating units of
            figure 1's comparison).

    The torchvision variant is torchvision's network as shipped: only ``num_classes`` and ``dropout``
    apply to it; ``lrn``, ``overlap_pool``, ``groups``, ``init`` and ``activation`` are the paper variants'
    ablations and are ignored (it is initialised as torchvision initialises it).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if variant == "torchvision":
        return _torchvision_alexnet(num_classes=num_classes, dropout=dropout)
    if variant not in ("paper", "one-gpu"):
        raise ValueError(f"unknown variant {variant!r}; choose 'paper', 'one-gpu' or 'torchvision'")
    if groups not in (1, 2):
        raise ValueError(f"groups must be 1 or 2, got {groups}")
    if init not in _INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {sorted(_INITS)}")
    if activation not in ("relu", "tanh"):
        raise ValueError(f"unknown activation {activation!r}; choose 'relu' or 'tanh'")
    model = _paper_alexnet(
        num_classes=num_classes, lrn=lrn, overlap_pool=overlap_pool,
        groups=1 if variant == "one-gpu" else groups, dropout=dropout,
        widths=_ONE_GPU_WIDTHS if variant == "one-gpu" else _PAPER_WIDTHS, activation=activation,
    )
    _INITS[init](model)
    return model


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (scalars) of ``model``: 60,965,224 for the paper variant with 1000 classes."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

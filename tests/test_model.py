"""Unit tests of alexnet.model: architecture, LRN formula, initialisations, ablations, torchvision parity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from alexnet.model import AlexNet, LocalResponseNorm, build_model, count_parameters

PAPER_PARAMETERS = 60_965_224
TORCHVISION_PARAMETERS = 61_100_840


@pytest.fixture(scope="module")
def paper_model() -> AlexNet:
    torch.manual_seed(0)
    return build_model().eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    # Roughly the scale of mean-subtracted [0, 1] pixels.
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 0.25


def _convs(model: AlexNet) -> dict[str, nn.Conv2d]:
    return {name: model.features.get_submodule(name) for name in ["conv1", "conv2", "conv3", "conv4", "conv5"]}


def _layer_weights(model: AlexNet) -> dict[str, nn.Module]:
    layers: dict[str, nn.Module] = dict(_convs(model))
    layers |= {name: model.classifier.get_submodule(name) for name in ["fc6", "fc7", "fc8"]}
    return layers


# -- the paper's architecture ---------------------------------------------------------------------------


def test_paper_parameter_count(paper_model: AlexNet) -> None:
    assert count_parameters(paper_model) == PAPER_PARAMETERS


def test_paper_shapes_through_the_network(paper_model: AlexNet, images: torch.Tensor) -> None:
    sizes: dict[str, tuple[int, ...]] = {}
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, tuple(o.shape)))
        for name, module in paper_model.features.named_children()
        if name.startswith(("conv", "pool"))
    ]
    try:
        with torch.no_grad():
            logits = paper_model(images)
    finally:
        for hook in hooks:
            hook.remove()
    assert sizes == {
        "conv1": (2, 96, 55, 55),
        "pool1": (2, 96, 27, 27),
        "conv2": (2, 256, 27, 27),
        "pool2": (2, 256, 13, 13),
        "conv3": (2, 384, 13, 13),
        "conv4": (2, 384, 13, 13),
        "conv5": (2, 256, 13, 13),
        "pool5": (2, 256, 6, 6),
    }
    assert logits.shape == (2, 1000)


def test_paper_layer_hyperparameters(paper_model: AlexNet) -> None:
    convs = _convs(paper_model)
    expected = {  # name: (out, in per group, kernel, stride, padding, groups)
        "conv1": (96, 3, 11, 4, 2, 1),
        "conv2": (256, 48, 5, 1, 2, 2),
        "conv3": (384, 256, 3, 1, 1, 1),
        "conv4": (384, 192, 3, 1, 1, 2),
        "conv5": (256, 192, 3, 1, 1, 2),
    }
    for name, (out_ch, in_per_group, kernel, stride, padding, groups) in expected.items():
        conv = convs[name]
        assert conv.weight.shape == (out_ch, in_per_group, kernel, kernel), name
        assert (conv.stride, conv.padding, conv.groups) == ((stride, stride), (padding, padding), groups), name
    pools = [m for m in paper_model.features if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride) for p in pools] == [(3, 2)] * 3
    norms = [m for m in paper_model.features if isinstance(m, LocalResponseNorm)]
    assert [(n.size, n.alpha, n.beta, n.k) for n in norms] == [(5, 1e-4, 0.75, 2.0)] * 2
    linears = [m for m in paper_model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(9216, 4096), (4096, 4096), (4096, 1000)]
    dropouts = [m.p for m in paper_model.classifier if isinstance(m, nn.Dropout)]
    assert dropouts == [0.5, 0.5]


def test_forward_features_taps(paper_model: AlexNet, images: torch.Tensor) -> None:
    expected = {
        "conv1": (2, 96, 55, 55),
        "conv2": (2, 256, 27, 27),
        "conv3": (2, 384, 13, 13),
        "conv4": (2, 384, 13, 13),
        "conv5": (2, 256, 13, 13),
        "pool5": (2, 256, 6, 6),
        "fc6": (2, 4096),
        "fc7": (2, 4096),
        "fc8": (2, 1000),
    }
    with torch.no_grad():
        for layer, shape in expected.items():
            activation = paper_model.forward_features(images, layer)
            assert activation.shape == shape, layer
            if layer.startswith(("conv", "fc6", "fc7")):
                assert activation.min() >= 0, f"{layer} should be post-ReLU"
        fc7_by_hook: list[torch.Tensor] = []
        tap = paper_model.get_submodule(paper_model.tap_points["fc7"])
        handle = tap.register_forward_hook(lambda m, i, o: fc7_by_hook.append(o.clone()))
        logits = paper_model(images)
        handle.remove()
        torch.testing.assert_close(fc7_by_hook[0], paper_model.forward_features(images, "fc7"))
        torch.testing.assert_close(logits, paper_model.forward_features(images, "fc8"))
    with pytest.raises(ValueError):
        paper_model.forward_features(images, "conv6")  # type: ignore[arg-type]


# -- local response normalisation -----------------------------------------------------------------------


def _lrn_by_hand(a: torch.Tensor, n: int, k: float, alpha: float, beta: float) -> torch.Tensor:
    """The paper's formula, channel by channel, in float64."""
    a = a.double()
    channels = a.shape[1]
    out = torch.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        window_sum = (a[:, lo : hi + 1] ** 2).sum(dim=1)
        out[:, i] = a[:, i] / (k + alpha * window_sum) ** beta
    return out


@pytest.mark.parametrize("n", [5, 3])
def test_lrn_matches_paper_formula(n: int) -> None:
    # Large activations so the alpha * sum term matters (with alpha 1e-4 it needs sums of order 1e4); the
    # first and last channels exercise the cut window.
    a = torch.randn(2, 11, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 60
    lrn = LocalResponseNorm(size=n, alpha=1e-4, beta=0.75, k=2.0)
    expected = _lrn_by_hand(a, n=n, k=2.0, alpha=1e-4, beta=0.75)
    torch.testing.assert_close(lrn(a), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lrn(a.float()).double(), expected, rtol=1e-5, atol=1e-5)
    # Not torch's convention (alpha / n), which would differ here.
    torch_lrn = nn.LocalResponseNorm(size=n, alpha=1e-4, beta=0.75, k=2.0)(a)
    assert (torch_lrn - expected).abs().max() > 1e-3


def test_lrn_edge_channels_explicitly() -> None:
    # One spatial position, 6 channels: channel 0 sums channels 0..2, channel 5 sums 3..5.
    a = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 60.0], dtype=torch.float64).reshape(1, 6, 1, 1) * 10
    out = LocalResponseNorm()(a).flatten()
    sq = (a.flatten() ** 2).tolist()
    assert out[0].item() == pytest.approx(100.0 / (2 + 1e-4 * sum(sq[0:3])) ** 0.75, rel=1e-12)
    assert out[2].item() == pytest.approx(300.0 / (2 + 1e-4 * sum(sq[0:5])) ** 0.75, rel=1e-12)
    assert out[5].item() == pytest.approx(600.0 / (2 + 1e-4 * sum(sq[3:6])) ** 0.75, rel=1e-12)


# -- initialisations ------------------------------------------------------------------------------------


def test_paper_init_statistics(paper_model: AlexNet) -> None:
    for name, layer in _layer_weights(paper_model).items():
        weight = layer.weight.detach()
        assert weight.std().item() == pytest.approx(0.01, rel=0.03), name
        assert abs(weight.mean().item()) < 1e-3, name
        bias_value = 1.0 if name in {"conv2", "conv4", "conv5", "fc6", "fc7"} else 0.0
        assert torch.all(layer.bias == bias_value), name


@pytest.fixture(scope="module")
def caffe_model() -> AlexNet:
    torch.manual_seed(0)
    return build_model(init="caffe").eval()


@pytest.fixture(scope="module")
def kaiming_model() -> AlexNet:
    torch.manual_seed(0)
    return build_model(init="kaiming").eval()


def test_caffe_init_statistics(caffe_model: AlexNet) -> None:
    for name, layer in _layer_weights(caffe_model).items():
        std = 0.005 if name in {"fc6", "fc7"} else 0.01
        assert layer.weight.detach().std().item() == pytest.approx(std, rel=0.03), name
        bias_value = 0.1 if name in {"conv2", "conv4", "conv5", "fc6", "fc7"} else 0.0
        assert torch.allclose(layer.bias, torch.full_like(layer.bias, bias_value)), name


def test_kaiming_init_statistics(kaiming_model: AlexNet) -> None:
    for name, layer in _layer_weights(kaiming_model).items():
        weight = layer.weight.detach()
        fan_in = weight[0].numel()  # per group for the grouped convolutions
        assert weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.05), name
        assert torch.all(layer.bias == 0), name


def _input_dependence(model: AlexNet, images: torch.Tensor) -> float:
    """How much logits vary across inputs, relative to how much they vary across classes."""
    with torch.no_grad():
        logits = model(images).double()
    return (logits.std(dim=0).mean() / logits.std(dim=1).mean()).item()


def test_kaiming_logits_depend_on_input(
    kaiming_model: AlexNet, paper_model: AlexNet, images: torch.Tensor
) -> None:
    # The paper's init is the documented pitfall: its logits are practically the same for every input
    # (the bias-1 path dominates), which is why training can sit at ln(1000). Kaiming's are not.
    assert _input_dependence(kaiming_model, images) > 1e-2
    assert _input_dependence(paper_model, images) < 1e-3


# -- ablation switches ----------------------------------------------------------------------------------


def test_groups_1_connects_every_map() -> None:
    model = build_model(groups=1)
    assert all(conv.groups == 1 for conv in _convs(model).values())
    # conv2, conv4 and conv5 see twice the input maps: +307,200 + 663,552 + 442,368 weights.
    assert count_parameters(model) == PAPER_PARAMETERS + 307_200 + 663_552 + 442_368 == 62_378_344


def test_one_gpu_net_has_half_the_kernels_in_one_tower(images: torch.Tensor) -> None:
    # The baseline of the paper's two-GPU comparison: half the kernels of conv1-conv4, one tower; conv5 and the
    # fully-connected layers keep their size (footnote 2), so it has about as many parameters as the paper net.
    model = build_model(variant="one-gpu").eval()
    convs = _convs(model)
    assert [c.out_channels for c in convs.values()] == [48, 128, 192, 192, 256]
    assert [c.in_channels for c in convs.values()] == [3, 48, 128, 192, 192]
    assert all(c.groups == 1 for c in convs.values())
    assert [model.classifier.get_submodule(n).out_features for n in ("fc6", "fc7")] == [4096, 4096]
    assert count_parameters(model) == 59_798_312
    assert any(isinstance(m, LocalResponseNorm) for m in model.modules())
    with torch.no_grad():
        assert model.forward_features(images, "pool5").shape == (2, 256, 6, 6)
        assert model(images).shape == (2, 1000)


def test_tanh_activation(images: torch.Tensor) -> None:
    model = build_model(activation="tanh", num_classes=10).eval()
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 7
    assert count_parameters(model) == count_parameters(build_model(num_classes=10))
    with torch.no_grad():
        conv1 = model.forward_features(images, "conv1")  # the tap keeps its name; tanh output can be negative
    assert conv1.min() < 0 and conv1.abs().max() <= 1


def test_no_lrn(images: torch.Tensor) -> None:
    model = build_model(lrn=False).eval()
    assert not any(isinstance(m, (LocalResponseNorm, nn.LocalResponseNorm)) for m in model.modules())
    assert count_parameters(model) == PAPER_PARAMETERS
    with torch.no_grad():
        assert model(images).shape == (2, 1000)


def test_non_overlapping_pool_keeps_6x6(images: torch.Tensor) -> None:
    model = build_model(overlap_pool=False).eval()
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride) for p in pools] == [(2, 2)] * 3
    with torch.no_grad():
        assert model.forward_features(images, "conv2").shape == (2, 256, 27, 27)
        assert model.forward_features(images, "conv5").shape == (2, 256, 13, 13)
        assert model.forward_features(images, "pool5").shape == (2, 256, 6, 6)
    assert count_parameters(model) == PAPER_PARAMETERS


def test_dropout_switch() -> None:
    model = build_model(dropout=0.0)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    model = build_model(dropout=0.3, num_classes=10)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    assert model.classifier.fc8.out_features == 10


@pytest.mark.parametrize(
    "kwargs",
    [dict(variant="nope"), dict(groups=3), dict(init="xavier"), dict(dropout=1.0), dict(num_classes=0),
     dict(activation="sigmoid")],
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_model(**kwargs)


def test_builder_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        build_model("paper")  # type: ignore[misc]


# -- torchvision variant --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchvision_model() -> AlexNet:
    torch.manual_seed(0)
    return build_model(variant="torchvision").eval()


def test_torchvision_variant_matches_torchvision(torchvision_model: AlexNet, images: torch.Tensor) -> None:
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.alexnet(weights=None).eval()
    assert count_parameters(torchvision_model) == count_parameters(reference) == TORCHVISION_PARAMETERS
    ours = {k: v.shape for k, v in torchvision_model.state_dict().items()}
    theirs = {k: v.shape for k, v in reference.state_dict().items()}
    assert ours == theirs
    torchvision_model.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(torchvision_model(images), reference(images))
        assert torchvision_model.forward_features(images, "fc7").shape == (2, 4096)
        assert torchvision_model.forward_features(images, "pool5").shape == (2, 256, 6, 6)


# -- every variant runs ---------------------------------------------------------------------------------


def test_forward_every_variant_and_init(
    paper_model: AlexNet,
    caffe_model: AlexNet,
    kaiming_model: AlexNet,
    torchvision_model: AlexNet,
    images: torch.Tensor,
) -> None:
    for model in (paper_model, caffe_model, kaiming_model, torchvision_model):
        with torch.no_grad():
            logits = model(images)
        assert logits.shape == (2, 1000)
        assert logits.dtype == torch.float32
        assert torch.isfinite(logits).all()


def test_backward_in_train_mode() -> None:
    model = build_model(num_classes=10, init="kaiming").train()
    x = torch.randn(2, 3, 224, 224)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

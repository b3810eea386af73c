"""Typed configs: presets load, unknown keys are errors, overrides are parsed to the field's type."""

from __future__ import annotations

from pathlib import Path

import pytest

from alexnet.config import Config, load_config, parse_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_presets_load_and_state_hardware_and_expected_result(preset):
    path = CONFIGS / preset
    cfg = load_config(path)
    header = path.read_text().split("\n\n")[0]
    assert "Hardware:" in header and "Expected result:" in header
    assert cfg.train.epochs > 0


def test_paper_preset_is_the_papers_recipe():
    cfg = load_config(CONFIGS / "paper.yaml")
    t = cfg.train
    assert (t.batch_size, t.lr, t.momentum, t.weight_decay, t.max_lr_drops) == (128, 0.01, 0.9, 0.0005, 3)
    assert t.schedule == "plateau" and 85 <= t.epochs <= 95
    assert cfg.model.variant == "paper" and cfg.model.init == "paper" and cfg.model.dropout == 0.5
    assert cfg.data.normalize == "mean_image" and cfg.data.lighting_std == 0.1 and cfg.data.crop == 224


def test_unknown_keys_and_sections_are_errors():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lr_typo'\] in section 'train'"):
        Config.from_dict({"train": {"lr_typo": 1}})
    with pytest.raises(ValueError, match="unknown config section"):
        Config.from_dict({"trainer": {}})


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "smoke.yaml", ["train.lr=0.02", "train.epochs=3", "train.bf16=true",
                                               "model.init=paper", "train.step_epochs=5,9", "data.data=s3://b/p"])
    assert cfg.train.lr == 0.02 and cfg.train.epochs == 3 and cfg.train.bf16 is True
    assert cfg.model.init == "paper" and cfg.train.step_epochs == [5, 9] and cfg.data.data == "s3://b/p"
    for bad, message in [("train.epochs=1.5", "integer"), ("train.bf16=maybe", "true or false"),
                         ("model.init=xavier", "must be one of"), ("train.lr=fast", "a number")]:
        with pytest.raises(ValueError, match=message):
            load_config(None, [bad])
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["lr=0.1"])


def test_flat_params_round_trip():
    cfg = load_config(CONFIGS / "paper.yaml")
    assert cfg.flat()["train.lr"] == 0.01
    assert Config.from_dict(cfg.to_dict()) == cfg

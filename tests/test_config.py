"""Typed configs: presets load, unknown keys are errors, overrides are parsed to the field's type."""

from __future__ import annotations

import re
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


def _numeric(hint) -> bool:
    import typing

    return hint in (int, float) or (typing.get_origin(hint) is list and typing.get_args(hint)[0] in (int, float))


def test_every_numeric_field_has_a_range():
    import dataclasses
    import typing

    from alexnet.config import RANGES

    numeric = {f"{s.name}.{name}" for s in dataclasses.fields(Config)
               for name, hint in typing.get_type_hints(s.default_factory).items() if _numeric(hint)}
    assert numeric == set(RANGES), "add the range of each new numeric field to alexnet.config.RANGES"


@pytest.mark.parametrize("override,allowed", [
    ("train.epochs=0", r"\[1, inf\)"), ("train.batch_size=-4", r"\[1, inf\)"), ("train.lr=nan", r"\(0, inf\)"),
    ("train.lr=inf", r"\(0, inf\)"), ("train.lr=0", r"\(0, inf\)"), ("model.dropout=1", r"\[0, 1\)"),
    ("train.max_failures=-1", r"\[0, inf\)"), ("train.weight_decay=-0.1", r"\[0, inf\)"),
    ("train.momentum=1.5", r"\[0, 1\)"), ("train.num_workers=0", r"\[1, inf\)"),
    ("train.step_epochs=30,-1", r"\[1, inf\)"), ("transfer.c_grid=[1.0, 0]", r"\(0, inf\)"),
])
def test_out_of_range_values_are_errors_naming_the_key_and_range(override, allowed):
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"^config: {key} must be in {allowed}, not "):
        load_config(None, [override])


def test_sections_made_in_code_are_checked_too():
    from alexnet.config import TransferConfig

    with pytest.raises(ValueError, match=r"transfer.epochs must be in \[1, inf\), not 0"):
        TransferConfig(epochs=0)


def test_a_bad_yaml_file_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [0.01\n  epochs: 3\n")
    with pytest.raises(ValueError, match=rf"^{bad}: not valid YAML at line \d+, column \d+: ") as e:
        load_config(bad)
    assert "\n" not in str(e.value)


def test_argparse_lives_in_the_cli_only():
    # Libraries take typed arguments; the command line is parsed in one place (the alexnet.cli package).
    root = Path(__file__).resolve().parents[1]
    users = sorted(str(p.relative_to(root)) for folder in ("alexnet", "pipelines") for p in (root / folder).rglob("*.py")
                   if re.search(r"^\s*(import argparse|from argparse import)", p.read_text(), re.M))
    assert users and all(u.startswith("alexnet/cli/") for u in users), users


def test_library_errors_name_the_parameter_not_the_flag(tmp_path):
    from alexnet.train import run_training

    cfg = load_config(None, [f"train.storage_path={tmp_path}"])
    with pytest.raises(ValueError, match=r"^data.data is empty") as e:
        run_training(cfg, tracking=False)
    assert not str(e.value).startswith("--")


def test_python_m_alexnet_train_parses_the_options_of_alexnet_train():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    shown = subprocess.run([sys.executable, "-m", "alexnet.train", "--help"], cwd=root, capture_output=True,
                           text=True, check=True).stdout
    assert shown.startswith("usage: python -m alexnet.train")
    assert all(flag in shown for flag in ("--config", "--data", "--set", "--ray-address", "--no-tracking"))


def test_no_private_name_is_imported_across_modules():
    import ast

    root = Path(__file__).resolve().parents[1]
    found = []
    for path in sorted([*(root / "alexnet").glob("*.py"), *(root / "pipelines").glob("*.py")]):
        tree = ast.parse(path.read_text())
        modules = set()  # names bound to one of our modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("alexnet", "pipelines", "flows"):
                found += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_")]
                modules |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                modules |= {a.asname or a.name for a in node.names if a.name.split(".")[0] in ("alexnet", "pipelines")}
        found += [f"{path.name}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in modules and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not found, found

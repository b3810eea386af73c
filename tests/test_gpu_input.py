"""benchmarks/gpu_input.py on the CPU with tiny sizes: every path runs end to end and the output says no GPU."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_input

pytestmark = [
    pytest.mark.slow,  # Ray prepares its shards (conftest.reader_shards, shared with test_data.py)
    pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback; a GPU run measures"),
]


def test_runs_on_cpu_and_says_no_gpu(reader_shards, capsys):
    assert gpu_input.main(["--data", reader_shards["jpeg"], "--raw-data", reader_shards["raw"], "--batch-size", "4",
                           "--batches", "3", "--warmup", "1", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "no GPU present" in out.splitlines()[0]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["benchmark"] == "gpu_input" and result["gpu"] is False and "no GPU" in result["note"]
    paths = {p["path"]: p for p in result["paths"]}
    assert "CUDA" in paths["jpeg+nvjpeg"]["skipped"]
    for name in ("jpeg+cpu", "raw"):  # measured: 3 batches of 4 normalised bf16 images each
        assert paths[name]["images"] == 12 and paths[name]["images_per_s"] > 0
        assert isinstance(paths[name]["feeds_the_step"], bool)
    assert paths["raw"]["decoder"] == "none" and paths["jpeg+cpu"]["decoder"] in ("simplejpeg", "torchvision", "pillow")
    assert result["train_step"]["images_per_s"] > 0 and result["train_step"]["mode"] == "fp32"

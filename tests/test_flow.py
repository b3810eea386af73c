"""The Prefect flow ``alexnet`` (flows/alexnet_flow.py) and its deployments (prefect.yaml).

Real Prefect throughout, no mocks: the in-process runs use ``prefect_test_harness`` (a temporary API with its own
database), the deployment test the README's commands (``prefect server`` + process worker) run here, the Ray test a
``ray start --head`` with token authentication on private ports and a private temp dir, the S3 test a moto server on
loopback, the UI test ``make mlflow-ui`` and Debian's headless Chromium (Selenium, no downloads). Every subprocess
gets its own ``PREFECT_HOME``; every server, worker, browser and Ray head started here is stopped (its process group)
even on failure. About 10 minutes on 2 cores for the slow tests together.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import (BIN, free_ports, isolated_env, mlflow_children, run_checked, start_process,
                            stop_process, wait_http)

ROOT = Path(__file__).resolve().parents[1]

#: A very small synthetic ImageNet (4 classes; 3 of its 64 files are undecodable on purpose, hence the 0.1 limit),
#: as preset overrides (the synthetic and prepare sections).
TINY = ["synthetic.classes=4", "synthetic.train_per_class=12", "synthetic.val_per_class=4", "synthetic.size=200",
        "prepare.max_bad_fraction=0.1", "prepare.shard_rows=16"]
#: The transfer stage runs in one flow test only (flow_runs' rerun): it adds minutes to every flow run.
TINY_PARAMS = {"synthetic": True, "post_training": ["register"]}
#: The transfer stage on one synthetic dataset, probe only, one C.
TRANSFER_SHORT = ["transfer.datasets=[\"voc2007\"]", "transfer.methods=[\"probe\"]", "transfer.c_grid=[1.0]"]
#: One short epoch.
SHORT = ["train.epochs=1", "data.limit_train=48", "train.max_failures=0"]
STAGE_RUNS = {"synthesize", "prepare", "stats", "evaluate"}


# --- fast: the module, its helpers and prefect.yaml ---------------------------------------------------------------


def test_flow_module_imports_without_torch_or_ray():
    """A Prefect worker loads the flow module; the heavy libraries are imported by the stages that need them."""
    code = "import sys, flows; print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_flow_parameters_are_typed():
    from flows import alexnet_flow

    schema = alexnet_flow.parameters.model_dump()
    props = schema["properties"]
    assert props["preset"]["default"] == "configs/smoke.yaml" and props["overrides"]["type"] == "array"
    for name in ("raw_uri", "data_uri", "source_uri", "synthetic", "ray_address", "mlflow_tracking_uri",
                 "results_dir", "refresh", "post_training", "checkpoint"):
        assert name in props, name
    assert alexnet_flow.name == "alexnet"
    assert len(props) <= 13, sorted(props)  # the rest is the preset's: prepare, synthetic, evaluate, transfer_data


def test_what_were_flow_parameters_are_preset_sections_with_one_default_each():
    """max_bad_fraction, shard_rows, the image recipe, the synthetic ImageNet, the crops and the transfer data's
    locations are preset keys (overrides); `alexnet prepare`'s defaults are the same dataclass defaults; unknown keys
    and out-of-range values are errors naming the key."""
    from alexnet.cli import build_parser
    from alexnet.config import PrepareConfig, load_config
    from flows import alexnet_flow

    props = alexnet_flow.parameters.model_dump()["properties"]
    assert not {"max_bad_fraction", "shard_rows", "image_format", "quality", "synthetic_spec", "crops",
                "eval_batch_size", "eval_limit", "download_verify", "transfer_data"} & set(props)
    cfg = load_config(ROOT / "configs" / "smoke.yaml", TINY + ["evaluate.crops=[1]", "transfer_data.raw_root=/t"])
    assert (cfg.prepare.max_bad_fraction, cfg.prepare.shard_rows, cfg.synthetic.classes) == (0.1, 16, 4)
    assert cfg.evaluate.crops == [1] and cfg.transfer_data.raw_root == "/t" and cfg.synthetic.quirks is True
    args = build_parser().parse_args(["prepare", "imagenet", "--source", "s", "--out", "o"])
    assert (args.format, args.quality, args.max_bad_fraction, args.shard_rows) == (
        PrepareConfig.image_format, PrepareConfig.quality, PrepareConfig.max_bad_fraction, None)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['shardrows'\] in section 'prepare'"):
        load_config(None, ["prepare.shardrows=3"])
    with pytest.raises(ValueError, match=r"synthetic.classes must be in \[3, inf\)"):
        load_config(None, ["synthetic.classes=2"])
    with pytest.raises(ValueError, match=r"transfer_data.max_bad_fraction must be in \[0, 1\]"):
        load_config(None, ["transfer_data.max_bad_fraction=2"])


def test_results_table_sets_this_run_beside_the_paper():
    from alexnet.results import imagenet_table

    table = imagenet_table({1: {"images": 50, "top1_err": 0.5, "top5_err": 0.25},
                            10: {"images": 50, "top1_err": 0.45, "top5_err": 0.2}}, preset="configs/paper.yaml")
    assert table["crops"] == [1, 10, 10] and table["top1_err_pct"] == [50.0, 45.0, 40.7]
    assert table["top5_err_pct"][-1] == 18.2


def test_cache_keys_cover_inputs_and_upstream_data_but_not_where_stages_run():
    from prefect.cache_policies import CompoundCachePolicy, Inputs

    from flows.caching import DatasetVersion, UriListing
    from flows.tasks import evaluate, prepare, stats, train

    for t, extra in ((prepare, UriListing), (stats, DatasetVersion), (train, DatasetVersion),
                     (evaluate, DatasetVersion)):
        policy = t.cache_policy
        assert isinstance(policy, CompoundCachePolicy) and policy.key_storage is None, policy
        (inputs,) = [p for p in policy.policies if isinstance(p, Inputs)]
        assert {"ray_address", "job_env"} <= set(inputs.exclude)
        (part,) = [p for p in policy.policies if isinstance(p, extra)]
        assert part.key_storage is None  # records live with the results (results_dir), nowhere else
        assert t.persist_result is True
    (train_inputs,) = [p for p in train.cache_policy.policies if isinstance(p, Inputs)]
    assert {"parent_run_id", "tags"} <= set(train_inputs.exclude)
    assert [p for p in train.cache_policy.policies if isinstance(p, DatasetVersion)][0].stats is True


def test_dataset_version_changes_with_the_manifest(tmp_path):
    from flows.caching import DatasetVersion

    policy = DatasetVersion(parameter="data_uri")
    missing = policy.compute_key(None, {"data_uri": str(tmp_path)}, {})
    assert missing != policy.compute_key(None, {"data_uri": str(tmp_path)}, {})  # incomplete data: never a hit
    (tmp_path / "manifest.json").write_text('{"a": 1}')
    first = policy.compute_key(None, {"data_uri": str(tmp_path)}, {})
    assert first == policy.compute_key(None, {"data_uri": str(tmp_path)}, {})
    (tmp_path / "manifest.json").write_text('{"a": 2}')
    assert policy.compute_key(None, {"data_uri": str(tmp_path)}, {}) != first


def test_io_stages_retry_transient_errors_only():
    from prefect.states import Failed

    from flows.ray_jobs import RayJobError
    from flows.tasks import worth_retrying
    from pipelines.download import ChecksumError, DownloadError
    from pipelines.prepare import PrepareError

    def retried(exc: BaseException) -> bool:
        return worth_retrying(None, None, Failed(data=exc))

    assert retried(ConnectionError("reset by peer")) and retried(TimeoutError())
    assert retried(DownloadError("busy", status=503)) and not retried(DownloadError("gone", status=404))
    assert not retried(ValueError("bad option")) and not retried(FileNotFoundError("no source"))
    assert not retried(ChecksumError("md5")) and not retried(PrepareError("too many rejects"))
    assert retried(RayJobError("supervisor died", transient=True)) and not retried(RayJobError("exit 2"))


def test_resolved_config_travels_to_a_ray_job_exactly():
    """The train job gets the resolved config as the JSON kwargs of `python -m flows.job` (one base64 token);
    decoding them gives the same config back."""
    from alexnet.config import Config, load_config
    from flows.ray_jobs import decode, encode

    cfg = load_config(ROOT / "configs" / "paper.yaml", ["data.data=s3://b/x", "train.step_epochs=[3,5]",
                                                        "tracking.tracking_uri=http://mlflow:5000"])
    token = encode({"config": cfg.to_dict(), "parent_run_id": None, "tags": {"a": "b c"}})
    assert shlex.split(token) == [token]  # one shell word: nothing to quote on the job's command line
    kwargs = decode(token)
    assert Config.from_dict(kwargs["config"]).to_dict() == cfg.to_dict() and kwargs["tags"] == {"a": "b c"}


def test_job_result_is_read_back_by_its_marker_not_by_scraping_printed_json(capsys):
    """`python -m flows.job` prints the function's result last, as one marked line; whatever the function printed
    (JSON included) is not taken for it. Locally, run_stage calls the function in this process."""
    from flows.job import main
    from flows.ray_jobs import encode, job_result, run_stage

    assert main(["json:dumps", encode({"obj": {"checkpoint": "/x", "n": 3}, "indent": 2})]) == 0
    printed = capsys.readouterr().out
    logs = "\n".join(["(pid=1) {not json", json.dumps({"a": {"b": [1, 2]}}, indent=2), printed,
                      "(TrainController pid=2) done", ""])
    assert json.loads(job_result(logs)) == {"checkpoint": "/x", "n": 3}
    with pytest.raises(ValueError, match="ALEXNET_RESULT"):
        job_result("no result here\n" + json.dumps({"checkpoint": "/x"}, indent=2))
    assert run_stage("json:loads", {"s": "[1, 2]"}, ray_address="local") == [1, 2]
    with pytest.raises(ValueError, match="module:function"):
        run_stage("json.loads", {}, ray_address=None)


def test_prefect_yaml_declares_one_deployment_per_preset():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (pull,) = spec["pull"]
    assert pull == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PWD }}"}}
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"full-reproduction", "smoke", "transfer", "ablations"}
    ablations = deployments.pop("ablations")  # flows/ablations.py, a flow also named alexnet: alexnet/ablations
    for d in deployments.values():
        assert d["entrypoint"] == "flows/alexnet_flow.py:alexnet_flow"
        assert d["work_pool"]["name"] == "alexnet-pool" and len(d["description"]) > 100
        assert (ROOT / d["parameters"]["preset"]).exists()
    assert deployments["full-reproduction"]["parameters"]["preset"] == "configs/paper.yaml"
    assert deployments["full-reproduction"]["parameters"]["synthetic"] is False
    assert deployments["smoke"]["parameters"]["synthetic"] is True
    transfer = deployments["transfer"]["parameters"]  # the transfer stage alone, for a checkpoint given at run time
    assert transfer["post_training"] == ["transfer"] and "checkpoint" in transfer and transfer["checkpoint"] is None
    from flows import alexnet_flow

    properties = alexnet_flow.parameters.model_dump()["properties"]
    for d in deployments.values():
        assert set(d["parameters"]) <= set(properties), set(d["parameters"]) - set(properties)
    from alexnet.config import load_config

    for d in deployments.values():  # valid overrides
        load_config(ROOT / d["parameters"]["preset"], d["parameters"]["overrides"])
    from flows.ablations import ablations_flow

    assert ablations["entrypoint"] == "flows/ablations.py:ablations_flow" and ablations_flow.name == "alexnet"
    assert set(ablations["parameters"]) <= set(ablations_flow.parameters.model_dump()["properties"])
    assert (ROOT / ablations["parameters"]["preset"]).exists() and (ROOT / "configs" / "ablate-smoke.yaml").exists()


# --- slow: the flow in this process ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect API (its own database) for the in-process flow runs of this module; local Ray only:
    ``RAY_ADDRESS=local``, Ray's value for a local instance, which the flow must not take for a cluster to submit
    Ray jobs to."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ADDRESS", "local")
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the harness's server inherits it
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="module")
def flow_runs(ray_local, prefect_api, tmp_path_factory):
    """A flow run whose train stage fails (batch 3 on 2 workers), then the corrected rerun, against a temporary
    Prefect API; returns both states, the rerun's task runs and the paths used."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows import alexnet_flow

    tmp = tmp_path_factory.mktemp("flow")
    common = dict(raw_uri=str(tmp / "raw"), data_uri=str(tmp / "prepared"),
                  mlflow_tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", results_dir=str(tmp / "results"),
                  **TINY_PARAMS)
    base = [*TINY, *SHORT, f"train.storage_path={tmp / 'ray'}", "train.run_name=flow-test"]
    transfer_data = [f"transfer_data.raw_root={tmp / 'transfer-raw'}", f"transfer_data.data_root={tmp / 'transfer'}"]
    started = time.perf_counter()
    failed = alexnet_flow(overrides=[*base, "train.batch_size=3"], return_state=True, **common)
    failed_s = time.perf_counter() - started
    started = time.perf_counter()
    rerun = alexnet_flow(overrides=[*base, "tracking.registered_model=alexnet-test", *TRANSFER_SHORT, *transfer_data],
                         return_state=True, **{**common, "post_training": ["register", "transfer"]})
    rerun_s = time.perf_counter() - started
    # the alexnet/transfer deployment's shape: transfer only, from the checkpoint the rerun trained
    checkpoint = rerun.result()["train"]["checkpoint"] if rerun.is_completed() else None
    transfer_only = alexnet_flow(overrides=[*base, *TRANSFER_SHORT, *transfer_data], return_state=True,
                                 **{**common, "post_training": ["transfer"]}, checkpoint=checkpoint) if checkpoint else None
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[rerun.state_details.flow_run_id])))
    print(f"failed run {failed_s:.0f} s, corrected rerun {rerun_s:.0f} s")
    return {"failed": failed, "rerun": rerun, "transfer_only": transfer_only, "task_runs": task_runs, "tmp": tmp,
            "tracking_uri": common["mlflow_tracking_uri"]}


@pytest.mark.slow
def test_failed_stage_is_named_and_the_rerun_skips_completed_stages(flow_runs):
    failed, rerun = flow_runs["failed"], flow_runs["rerun"]
    assert failed.is_failed()
    assert "stage 'train' failed" in failed.message and "not divisible by 2 workers" in failed.message
    assert rerun.is_completed(), rerun.message
    states = {t.name.split("-")[0]: t.state.name for t in flow_runs["task_runs"] if not t.name.startswith("evaluate")}
    assert states["synthesize"] == states["prepare"] == states["stats"] == "Cached", states
    assert states["train"] == "Completed", states
    summary = rerun.result()
    assert {k: v["state"] for k, v in summary["stages"].items()} == {
        "synthesize": "Cached", "prepare": "Cached", "stats": "Cached", "train": "Completed",
        "evaluate": "Completed", "register": "Completed", "transfer-voc2007-data": "Completed",
        "transfer-voc2007-probe": "Completed", "report": "Completed"}
    # run_smoke's summary content, and the paper's numbers next to ours
    assert summary["splits"]["train"]["rows"] == 46 and summary["splits"]["val"]["rows"] == 15
    assert len(summary["rejects"]) == 3 and len(summary["eigval"]) == 3
    assert set(summary["val_error"]) == {"1 crop", "10 crops"} and summary["chance_top1_error"] == 0.75
    assert summary["paper_val_error"]["10 crops"] == {"top1": 0.407, "top5": 0.182}
    assert summary["train"]["epochs"] == 1 and Path(summary["train"]["checkpoint"]).exists()
    assert summary["registered_model"]["name"] == "alexnet-test" and summary["registered_model"]["alias"] == "champion"
    assert "make mlflow-ui" in summary["mlflow"]["ui"]
    # the transfer stage: the synthetic VOC 2007, a linear probe on fc7 and fc6, beside the literature
    (result,) = summary["post_training"]["transfer"]["results"]
    assert result["dataset"] == "voc2007" and result["metric"] == "map_11point" and set(result["layers"]) == {"fc7",
                                                                                                            "fc6"}
    assert result["value"] > result["chance"] + 0.15, result
    table = summary["transfer"]
    assert table["layer"] == ["fc7", "fc6"] and table["literature_pct"] == [77.2, 77.2]
    from flows.alexnet_flow import format_report

    assert "transfer voc2007" in format_report(summary)


@pytest.mark.slow
def test_transfer_only_run_from_a_checkpoint_reuses_the_cached_transfer(flow_runs):
    """The alexnet/transfer deployment's parameters: no ImageNet stage runs; the same checkpoint, data and settings
    as the full run's transfer stage make the same (cached) result."""
    run = flow_runs["transfer_only"]
    assert run is not None and run.is_completed(), run and run.message
    summary = run.result()
    assert {k: v["state"] for k, v in summary["stages"].items()} == {
        "transfer-voc2007-data": "Cached", "transfer-voc2007-probe": "Cached", "report": "Completed"}
    assert summary["checkpoint"] == flow_runs["rerun"].result()["train"]["checkpoint"]
    assert summary["transfer"] == flow_runs["rerun"].result()["transfer"]
    from flows.alexnet_flow import format_report

    text = format_report(summary)
    assert "checkpoint: " in text and "transfer voc2007" in text and "training run -" in text


@pytest.mark.slow
def test_mlflow_holds_the_parent_run_a_child_per_stage_and_the_results_table(flow_runs):
    import mlflow

    summary = flow_runs["rerun"].result()
    client = mlflow.MlflowClient(flow_runs["tracking_uri"])
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert tags["prefect.flow_run_id"] == str(flow_runs["rerun"].state_details.flow_run_id)
    assert len(tags["git_commit"]) >= 7 and tags["git_commit"] != "unknown"
    assert tags["data_manifest_sha256"] == summary["data_manifest_sha256"] and len(tags["data_manifest_sha256"]) == 64
    assert tags["stats_sha256"] == summary["stats_sha256"] and len(tags["stats_sha256"]) == 64
    for crops, name in ((1, "1 crop"), (10, "10 crops")):
        for k in ("top1", "top5"):
            assert parent.data.metrics[f"val_{k}_err_{crops}crop"] == pytest.approx(summary["val_error"][name][k],
                                                                                    abs=1e-4)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "results.md", "results.csv", "results_table.json", "summary.json"} <= artifacts
    assert {"per_class_val_10crop.json", "confused_pairs_val_10crop.json"} <= artifacts  # as `alexnet evaluate`
    per_class = json.loads(Path(client.download_artifacts(parent.info.run_id, "per_class_val_10crop.json")).read_text())
    assert len(per_class["data"]) == round(1 / (1 - summary["chance_top1_error"]))  # a row per class
    assert "wnid" in per_class["columns"] and "top1_err" in per_class["columns"]
    results = json.loads(Path(client.download_artifacts(parent.info.run_id, "results.json")).read_text())
    assert [r["crops"] for r in results["results"]] == [1, 10, 10]
    assert results["results"][-1]["top1_err_pct"] == 40.7 and results["results"][-1]["top5_err_pct"] == 18.2
    markdown = Path(client.download_artifacts(parent.info.run_id, "results.md")).read_text()
    assert "paper, 1 CNN" in markdown and "40.7" in markdown

    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["alexnet.stage"]: r for r in children}
    assert set(by_stage) == STAGE_RUNS | {"train", "register", "transfer-voc2007-data", "transfer"}, sorted(by_stage)
    transfer_run = by_stage["transfer"]  # made by run_transfer, a child of the flow's parent run
    assert transfer_run.info.run_name == "transfer-voc2007-probe"
    assert transfer_run.data.metrics["map_11point"] == pytest.approx(summary["transfer"]["this_run_pct"][0] / 100,
                                                                     abs=1e-4)
    assert {"transfer_results.md", "transfer_table.json"} <= {a.path for a in client.list_artifacts(
        transfer_run.info.run_id)}
    assert {"transfer_results.json", "transfer_results.md", "transfer_results_table.json"} <= artifacts
    assert "Razavian" in Path(client.download_artifacts(parent.info.run_id, "transfer_results.md")).read_text()
    assert all(r.info.status == "FINISHED" for r in children)
    assert by_stage["prepare"].data.tags["alexnet.cached"] == "true"
    training = by_stage["train"]  # the training run itself, made by rank 0 of run_training
    assert training.info.run_id == summary["mlflow"]["run_id"]
    assert training.data.tags["prefect.flow_run_id"] == tags["prefect.flow_run_id"]
    assert "val_top1_err" in training.data.metrics and "eval_val_10crop_top1_err" in training.data.metrics
    assert "val_top5_err_10crop" in by_stage["evaluate"].data.metrics
    version = client.get_model_version_by_alias("alexnet-test", "champion")
    assert version.run_id == training.info.run_id and version.tags["prefect.flow_run_id"] == tags["prefect.flow_run_id"]

    # the failed run: its parent and its train child are FAILED, with the cause
    failed_parent = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.`prefect.flow_run_id` = '{flow_runs['failed'].state_details.flow_run_id}'"))
    (failed_parent,) = [r for r in failed_parent if "mlflow.parentRunId" not in r.data.tags]
    assert failed_parent.info.status == "FAILED" and "stage 'train' failed" in failed_parent.data.tags["alexnet.error"]


# --- slow: the MLflow UI of the flow's store, in headless Chromium ----------------------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")  # Debian: chromium, chromium-driver
#: Where browser tests leave their screenshots (git-ignored).
ARTIFACTS = ROOT / "test-artifacts"


def _require_chromium() -> None:
    """Skip when Debian's chromium and chromium-driver are not installed; fail instead under ``.ci/run``, which
    installs them and sets ALEXNET_REQUIRE_BROWSER."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        reason = (f"{CHROMIUM} or {CHROMEDRIVER} missing: `apt-get install chromium chromium-driver` "
                  "(Debian; .ci/run installs them)")
        if os.environ.get("ALEXNET_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)


def _headless_chromium(tmp: Path):
    """Debian's chromium through its chromedriver, both by path: Selenium Manager downloads nothing. A fresh profile;
    no first-run, sync, component or background traffic."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1920,1080",
                f"--user-data-dir={tmp / 'chromium-profile'}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER), log_output=str(tmp / "chromedriver.log")),
                            options=options)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlflow_ui_shows_the_flow_runs_in_headless_chromium(flow_runs, tmp_path, monkeypatch):
    """`make mlflow-ui` on the flow's store (the command the flow's summary prints), opened in headless Chromium:
    the experiment page renders the experiment and the parent runs, and expanding the corrected run's parent shows a
    child run per stage. Leaves a screenshot in test-artifacts/."""
    _require_chromium()
    import mlflow
    from selenium.common.exceptions import (ElementClickInterceptedException, StaleElementReferenceException,
                                            TimeoutException)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager stays offline (it is not called: paths are given)
    summary = flow_runs["rerun"].result()
    tracking_uri, experiment = summary["mlflow"]["tracking_uri"], summary["mlflow"]["experiment"]
    assert summary["mlflow"]["ui"].startswith(f"MLFLOW_TRACKING_URI={tracking_uri} make mlflow-ui")
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    children = sorted(r.info.run_name for r in client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"))
    assert len(children) >= 6, children  # synthesize, prepare, stats, the training run, evaluate, register
    (failed_parent,) = [r.info.run_name for r in client.search_runs([experiment_id], filter_string=(
        f"tags.`prefect.flow_run_id` = '{flow_runs['failed'].state_details.flow_run_id}'"))
        if "mlflow.parentRunId" not in r.data.tags]

    (port,) = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    env = isolated_env(tmp_path, MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_PORT=str(port))
    # The README's `make mlflow-ui`, with the store the summary names; -o: never (re)build .venv from a test.
    ui = start_process(["make", "-s", "-o", ".venv/.installed", "mlflow-ui", f"BIN={BIN}"], env, tmp_path / "mlflow-ui.log")
    browser = None
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "mlflow-ui-experiment.png"
    started = time.perf_counter()
    try:
        wait_http(f"{base}/health", 180, proc=ui, log=tmp_path / "mlflow-ui.log", expect=b"OK")
        print(f"make mlflow-ui answered in {time.perf_counter() - started:.1f} s")
        browser = _headless_chromium(tmp_path)
        started = time.perf_counter()
        # MLflow 3 opens experiments in its GenAI view; the runs table is the "Model training" view.
        browser.get(f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
        # React re-renders rows while data arrives: look elements up afresh on every poll
        wait = WebDriverWait(browser, 120, poll_frequency=0.5,
                             ignored_exceptions=[StaleElementReferenceException, ElementClickInterceptedException])

        def run_links() -> set[str]:
            """The run names rendered as links in the rows of the runs table."""
            return {a.text.strip() for a in browser.find_elements(By.CSS_SELECTOR, "[role='row'] a")}

        wait.until(lambda _: {parent.info.run_name, failed_parent} <= run_links(),
                   f"the parent runs {parent.info.run_name}, {failed_parent} were not rendered")

        def unfold(_) -> bool:  # child runs are folded under their parent: unfold the corrected run's
            row = browser.find_element(By.XPATH, f"//a[normalize-space()='{parent.info.run_name}']"
                                                 "/ancestor::*[@role='row'][1]")
            row.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']").click()
            return True

        wait.until(unfold)
        try:
            wait.until(lambda _: set(children) <= run_links())
        except TimeoutException:
            raise AssertionError(f"child runs {children} not all shown: {sorted(run_links())}") from None
        print(f"MLflow UI rendered the runs in {time.perf_counter() - started:.1f} s")
        assert experiment in browser.find_element(By.TAG_NAME, "body").text  # breadcrumb and sidebar
        assert {parent.info.run_name, failed_parent, *children} <= run_links()
    finally:
        if browser is not None:
            try:
                browser.save_screenshot(str(screenshot))
                print(f"screenshot: {screenshot}")
            finally:
                browser.quit()
        stop_process(ui)
    assert screenshot.stat().st_size > 10_000


@pytest.mark.slow
def test_credentials_in_uris_reach_no_mlflow_param_tag_or_prefect_log(prefect_api, tmp_path, caplog):
    """A presigned source_uri with a password, and a password in an override: the download stage fails (HTTP 404
    from a loopback server) and no secret is in the MLflow store, the flow run's Prefect logs, its state message or
    the captured logs; the URIs still say where (redacted)."""
    import http.server
    import threading

    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows import alexnet_flow

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secrets = ("src-PASSWORD", "AKIAPRESIGNED", "5f3c0ffeeSIGNATURE", "ovr-PASSWORD")
    source = (f"http://user:src-PASSWORD@127.0.0.1:{server.server_address[1]}/ilsvrc?X-Amz-Credential=AKIAPRESIGNED"
              "&X-Amz-Signature=5f3c0ffeeSIGNATURE")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        with caplog.at_level("INFO"):
            state = alexnet_flow(raw_uri=str(tmp_path / "raw"), data_uri=str(tmp_path / "prepared"), source_uri=source,
                                 mlflow_tracking_uri=tracking_uri, results_dir=str(tmp_path / "results"),
                                 overrides=["train.storage_path=https://user:ovr-PASSWORD@store.example/runs"],
                                 return_state=True)
    finally:
        server.shutdown()
        server.server_close()
    assert state.is_failed() and "stage 'download' failed" in state.message and "HTTP 404" in state.message
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    store = mlflow.MlflowClient(tracking_uri)
    runs = store.search_runs([e.experiment_id for e in store.search_experiments()])
    stored = json.dumps([[r.data.params, r.data.tags] for r in runs])
    assert "user:***@127.0.0.1" in stored and "X-Amz-Signature=***" in stored and "HTTP 404" in stored
    seen = "\n".join([stored, state.message, *(log.message for log in logs), caplog.text])
    assert logs and not [s for s in secrets if s in seen], [line for line in seen.splitlines()
                                                            if any(s in line for s in secrets)]


# --- slow: the flow with its data and checkpoints on S3 (a moto server on loopback) ----------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flow_with_s3_storage(synth_root, s3_endpoint, ray_local, prefect_api, tmp_path):
    """The official files, the prepared dataset, its statistics and the checkpoints on s3:// (a moto server on
    127.0.0.1); Prefect results and MLflow stay local. One short epoch, the centre-crop evaluation only."""
    import boto3
    import mlflow

    from flows import alexnet_flow
    from tests.conftest import upload_tree

    bucket = "alexnet-flow"
    raw_uri = upload_tree(synth_root / "official", bucket, "raw")
    data_uri, storage_path = f"s3://{bucket}/imagenet-256", f"s3://{bucket}/alexnet-runs"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = time.perf_counter()
    state = alexnet_flow(raw_uri=raw_uri, data_uri=data_uri, mlflow_tracking_uri=tracking_uri,
                         results_dir=str(tmp_path / "results"), post_training=[],
                         overrides=[*SHORT, "evaluate.crops=[1]", "prepare.max_bad_fraction=0.1",
                                    "prepare.shard_rows=16", f"train.storage_path={storage_path}",
                                    "train.run_name=s3-flow",
                                    "train.num_workers=1",  # DDP is tested elsewhere; one worker starts sooner
                                    "tracking.log_model=false"],
                         return_state=True)
    print(f"flow on S3: {time.perf_counter() - started:.0f} s")
    assert state.is_completed(), state.message
    summary = state.result()

    s3 = boto3.client("s3")
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])}
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="imagenet-256/manifest.json")["Body"].read())
    shards = [s["path"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]]
    assert len(shards) >= 4 and {f"imagenet-256/{p}" for p in shards} <= keys
    assert {"imagenet-256/stats.json", "imagenet-256/mean_image.npy"} <= keys
    stats = json.loads(s3.get_object(Bucket=bucket, Key="imagenet-256/stats.json")["Body"].read())
    assert stats["eigval"] == pytest.approx(summary["eigval"], abs=1e-6)

    checkpoint = summary["train"]["checkpoint"]
    assert checkpoint.startswith(f"{storage_path}/s3-flow/"), checkpoint
    assert f"{checkpoint[len(f's3://{bucket}/'):]}/checkpoint.pt" in keys
    assert summary["data"] == data_uri and summary["stages"]["train"]["state"] == "Completed"
    assert summary["splits"]["train"]["rows"] == 46 and summary["splits"]["val"]["rows"] == 15
    top1 = summary["val_error"]["1 crop"]["top1"]
    assert 0 <= summary["val_error"]["1 crop"]["top5"] <= top1 <= 1

    parent = mlflow.MlflowClient(tracking_uri).get_run(summary["mlflow"]["parent_run_id"])
    assert parent.data.params["flow.data_uri"] == data_uri and parent.data.params["flow.raw_uri"] == raw_uri
    assert parent.data.metrics["val_top1_err_1crop"] == pytest.approx(top1, abs=1e-4)


# --- slow: a Prefect server, a process worker and the smoke deployment --------------------------------------------


def readme_commands(heading: str) -> list[str]:
    """The commands of the first bash block under ``heading`` in README.md: comments dropped, continuation lines
    joined."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        command = " ".join(shlex.split(line, comments=True))
        if command:
            commands.append(command)
    return commands


def test_readme_prefect_server_block_is_the_one_the_server_test_runs():
    """The server test below runs the first six commands of the README's block, in this order; the block's other
    commands run deployments of prefect.yaml with parameters the flow has."""
    commands = readme_commands("### Run on a Prefect server")
    assert commands[:6] == [
        "prefect server start", "export PREFECT_API_URL=http://127.0.0.1:4200/api",
        "prefect work-pool create alexnet-pool --type process", "prefect deploy --all",
        "prefect worker start --pool alexnet-pool", "prefect deployment run alexnet/smoke --watch"], commands
    from flows import alexnet_flow

    properties = set(alexnet_flow.parameters.model_dump()["properties"])
    deployments = {f"alexnet/{d['name']}" for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert any("alexnet/full-reproduction" in c for c in commands[6:]), commands
    for command in commands[6:]:
        argv = shlex.split(command)
        assert argv[:3] == ["prefect", "deployment", "run"] and argv[3] in deployments, command
        params = {argv[i + 1].split("=", 1)[0] for i, a in enumerate(argv[:-1]) if a == "--param"}
        assert params <= properties, command


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smoke_deployment_runs_on_a_prefect_server_and_worker(tmp_path):
    """The README's "Run on a Prefect server" commands as written: prefect server + `prefect deploy --all`
    (prefect.yaml) + a process worker on alexnet-pool; the smoke deployment, shortened with --param, ends Completed
    and leaves its MLflow lineage in the worker's store. Two changes, both from outside the commands: the server's
    port (a free one, through PREFECT_SERVER_API_PORT, and the same in PREFECT_API_URL), and options appended to
    `prefect deployment run` (--param, --watch-timeout)."""
    (server_cmd, export, pool_cmd, deploy_cmd, worker_cmd, smoke_cmd) = readme_commands(
        "### Run on a Prefect server")[:6]
    (port,) = free_ports(1)
    readme_api = export.removeprefix("export PREFECT_API_URL=")
    assert readme_api == "http://127.0.0.1:4200/api", export  # prefect server start's default address
    api = readme_api.replace(":4200/", f":{port}/")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server_env = isolated_env(tmp_path, PREFECT_SERVER_API_PORT=str(port))
    client_env = isolated_env(tmp_path, PREFECT_API_URL=api, PWD=str(ROOT))  # a shell in the repository root
    server = worker = None
    try:
        server = start_process(shlex.split(server_cmd), server_env, tmp_path / "server.log")
        wait_http(f"{api}/health", 180, proc=server, log=tmp_path / "server.log", expect=b"true")
        run_checked(shlex.split(pool_cmd), client_env, 120)
        deployed = run_checked(shlex.split(deploy_cmd), client_env, 300)
        assert "alexnet/smoke" in deployed.stdout and "alexnet/full-reproduction" in deployed.stdout, deployed.stdout

        inspect = run_checked(["prefect", "deployment", "inspect", "alexnet/smoke"], client_env, 60)
        assert str(ROOT) in inspect.stdout and "set_working_directory" in inspect.stdout  # {{ $PWD }} resolved

        worker = start_process(shlex.split(worker_cmd), {**client_env, "MLFLOW_TRACKING_URI": tracking_uri},
                        tmp_path / "worker.log")
        params = {"raw_uri": str(tmp_path / "raw"), "data_uri": str(tmp_path / "prepared"),
                  "results_dir": str(tmp_path / "results"), **TINY_PARAMS,
                  "overrides": ["tracking.registered_model=alexnet-smoke", f"train.storage_path={tmp_path / 'ray'}",
                                "evaluate.crops=[1]", *TINY, *SHORT]}
        cmd = [*shlex.split(smoke_cmd), "--watch-timeout", "480"]
        for k, v in params.items():
            cmd += ["--param", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        started = time.perf_counter()
        ran = subprocess.run(cmd, env=client_env, cwd=ROOT, capture_output=True, text=True, timeout=540)
        print(f"deployment run: {time.perf_counter() - started:.0f} s")
        output = ran.stdout + ran.stderr
        worker_log = (tmp_path / "worker.log").read_text()
        assert ran.returncode == 0 and "Completed" in output, output[-3000:] + worker_log[-6000:]
    finally:
        stop_process(worker)
        stop_process(server)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("alexnet-smoke").experiment_id])
                 if r.info.run_name.startswith("flow-")]
    runs = mlflow_children(tracking_uri, parent.info.run_id)
    assert runs["parent"].data.tags["prefect.deployment"] == "smoke"
    assert set(runs) >= {"parent", "synthesize", "prepare", "stats", "train", "evaluate", "register"}
    assert "val_top1_err_1crop" in runs["parent"].data.metrics and "val_top1_err" in runs["train"].data.metrics
    assert client.get_model_version_by_alias("alexnet-smoke", "champion").run_id == runs["train"].info.run_id


# --- slow: the heavy stages as Ray jobs on a token-authenticated Ray head -------------------------------------------

_FLOW_SCRIPT = textwrap.dedent("""
    import json, sys
    from flows import alexnet_flow
    summary = alexnet_flow(**json.loads(sys.argv[1]))
    open(sys.argv[2], "w").write(json.dumps(summary, default=str))
""")

_FAILING_JOB = textwrap.dedent("""
    import sys
    from flows.ray_jobs import RayJobError, run_ray_job
    try:
        run_ray_job(sys.argv[1], "doomed", ["-c", "import sys; print('the cause, in the job'); sys.exit(3)"])
    except RayJobError as e:
        print("RAISED", str(e).replace(chr(10), " | "), "TRANSIENT", e.transient)
""")

_LIST_JOBS = textwrap.dedent("""
    import json, sys
    from flows.ray_jobs import job_client
    jobs = job_client(sys.argv[1]).list_jobs()  # a GCS address works too: the client asks the GCS for the dashboard
    print(json.dumps([{"id": j.submission_id, "entrypoint": j.entrypoint, "status": str(j.status.value),
                       "metadata": j.metadata} for j in jobs]))
""")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_heavy_stages_run_as_ray_jobs_on_a_token_authenticated_head(token_head, tmp_path):
    """With ray_address the flow submits prepare, stats, train and evaluate as Ray jobs (`python -m flows.job` on
    the stage's JSON kwargs, with the repository as working_dir) to a `ray start --head` cluster with token auth,
    started as README Tier 2 says from a shell without the venv on PATH (the jobs name their interpreter); the
    results come back from the jobs and the training run joins the flow's lineage."""
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = isolated_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token_head["token"],
                       PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")  # 2 busy cores: 20 s is short
    address = token_head["address"]
    with pytest.raises(urllib.error.HTTPError):  # token auth is on
        urllib.request.urlopen(f"{address}/api/version", timeout=10)
    assert str(BIN) not in token_head["env"]["PATH"].split(":")  # the head's jobs get no venv from PATH

    params = {"raw_uri": str(tmp_path / "raw"), "data_uri": str(tmp_path / "prepared"),
              "results_dir": str(tmp_path / "results"), "ray_address": address,
              "mlflow_tracking_uri": tracking_uri, **TINY_PARAMS,
              "overrides": [f"train.storage_path={tmp_path / 'ray'}", "evaluate.crops=[1, 10]", *TINY, *SHORT]}
    started = time.perf_counter()
    ran = run_checked([sys.executable, "-c", _FLOW_SCRIPT, json.dumps(params), str(tmp_path / "summary.json")], env,
                      480)
    (tmp_path / "flow.log").write_text(ran.stdout + ran.stderr)
    print(f"flow with Ray jobs: {time.perf_counter() - started:.0f} s")
    summary = json.loads((tmp_path / "summary.json").read_text())
    listed = run_checked([sys.executable, "-c", _LIST_JOBS, token_head["gcs"]], env, 120)
    doomed = run_checked([sys.executable, "-c", _FAILING_JOB, address], env, 120).stdout

    flow_run_id = summary["prefect"]["flow_run_id"]  # the head is shared: this flow run's jobs
    jobs = [j for j in json.loads(listed.stdout.strip().splitlines()[-1])
            if (j["metadata"] or {}).get("prefect_flow_run_id") == flow_run_id]
    by_stage = {j["metadata"].get("alexnet_stage"): j for j in jobs}
    assert set(by_stage) == {"prepare", "stats", "train", "evaluate-1crop", "evaluate-10crop"}, jobs
    assert all(j["status"] == "SUCCEEDED" for j in jobs), jobs
    assert "-m flows.job flows.stages:prepare " in by_stage["prepare"]["entrypoint"]
    assert "-m flows.job flows.stages:stats " in by_stage["stats"]["entrypoint"]
    assert "-m flows.job flows.stages:train " in by_stage["train"]["entrypoint"]
    assert all("--set" not in j["entrypoint"] for j in jobs)  # no flags rebuilt by hand
    assert summary["stages"]["train"]["state"] == "Completed" and set(summary["val_error"]) == {"1 crop", "10 crops"}
    assert summary["splits"]["train"]["rows"] == 46 and len(summary["eigval"]) == 3  # results read back from jobs

    assert "RAISED" in doomed and "ended FAILED" in doomed and "the cause, in the job" in doomed, doomed
    assert "TRANSIENT False" in doomed  # the entrypoint failed: a retry would fail the same way
    flow_log = (tmp_path / "flow.log").read_text()
    assert f"[{by_stage['train']['id']}]" in flow_log and "epoch 1/1" in flow_log  # job logs relayed to Prefect
    assert "ALEXNET_RESULT" not in flow_log  # results are returned, not logged

    runs = mlflow_children(tracking_uri, summary["mlflow"]["parent_run_id"])
    assert runs["train"].info.run_id == summary["mlflow"]["run_id"]  # made by the job, in the flow's lineage
    assert runs["train"].data.tags["git_commit"] == runs["parent"].data.tags["git_commit"] != "unknown"
    assert "val_top1_err" in runs["train"].data.metrics

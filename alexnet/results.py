"""Results tables: this run's numbers beside the published ones. Plain Python (no torch), so the Prefect flow,
the CLI and the library share one definition of each table and of the numbers it compares against."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

#: ILSVRC-2012 validation error of one CNN in the paper (Table 2), 10 crops.
PAPER_VAL_ERRORS = {"top1_err": 0.407, "top5_err": 0.182}

#: Published numbers with AlexNet-era ImageNet features (``../shared/paper-facts.md``).
TRANSFER_LITERATURE: dict[str, dict[str, Any]] = {
    "caltech101": {"metric": "mean_per_class_accuracy", "value": 0.865, "std": 0.005,
                   "source": "Zeiler & Fergus 2013, 30 images/class, 5 splits (DeCAF: 86.9)"},
    "flowers102": {"metric": "mean_per_class_accuracy", "value": 0.868,
                   "source": "Razavian et al. 2014, OverFeat features + linear SVM"},
    "voc2007": {"metric": "map_11point", "value": 0.772,
                "source": "Razavian et al. 2014, OverFeat features + linear SVM"},
}


def imagenet_table(evaluations: dict[int, dict[str, Any]], *, preset: str) -> dict[str, list]:
    """Columns of the ImageNet table: this run's errors (per crop count) next to the paper's 1-CNN result."""
    rows = [(f"this run ({Path(preset).name}, {e['images']} val images)", crops, e["top1_err"], e["top5_err"])
            for crops, e in sorted(evaluations.items())]
    rows.append(("paper, 1 CNN (ILSVRC-2012 val)", 10, PAPER_VAL_ERRORS["top1_err"], PAPER_VAL_ERRORS["top5_err"]))
    return {"model": [r[0] for r in rows], "crops": [r[1] for r in rows],
            "top1_err_pct": [round(100 * r[2], 2) for r in rows], "top5_err_pct": [round(100 * r[3], 2) for r in rows]}


def transfer_table(results: list[dict[str, Any]]) -> dict[str, list]:
    """Columns of the transfer table: each result of ``alexnet.transfer.run_transfer`` (one row per probed layer)
    beside the literature number and chance."""
    rows = []
    for r in results:
        lit = TRANSFER_LITERATURE[r["dataset"]]
        for one in (r.get("layers") or {r.get("layer", ""): r}).values():
            rows.append((r["dataset"], r["method"], one.get("layer", ""), one["metric"], round(100 * one["value"], 2),
                         round(100 * one["std"], 2), one["splits"], round(100 * lit["value"], 1), lit["source"],
                         round(100 * one["chance"], 2)))
    names = ["dataset", "method", "layer", "metric", "this_run_pct", "std_pct", "splits", "literature_pct",
             "literature_source", "chance_pct"]
    return {n: [row[i] for row in rows] for i, n in enumerate(names)}


def markdown(table: dict[str, list]) -> str:
    keys = list(table)
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(str(table[k][i]) for k in keys) + " |" for i in range(len(table[keys[0]]))]
    return "\n".join(out) + "\n"


def csv_text(table: dict[str, list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(table)
    writer.writerows(zip(*table.values()))
    return buf.getvalue()


def format_report(summary: dict[str, Any]) -> str:
    """The short, human summary of a flow run (the summary dict the ``alexnet`` flow returns)."""
    lines = [f"alexnet flow run {summary['prefect'].get('flow_run_name')} ({summary['prefect'].get('flow_run_id')})"]
    for name, s in summary["stages"].items():
        lines.append(f"  {name:<29} {s['state']:<9} {s['seconds']:8.1f} s")
    if "splits" in summary:  # the ImageNet stages ran (not a transfer-only run from a given checkpoint)
        splits = ", ".join(f"{k} {v['rows']} rows ({v['rejected']} rejected)" for k, v in summary["splits"].items())
        lines.append(f"data: {summary['data']}: {splits}")
        lines.append(f"train: {summary['train'].get('epochs')} epochs, checkpoint {summary['train'].get('checkpoint')}")
        for name, err in summary.get("val_error", {}).items():
            lines.append(f"val error, {name}: top-1 {100 * err['top1']:.1f}%, top-5 {100 * err['top5']:.1f}%")
        paper = summary["paper_val_error"]["10 crops"]
        lines.append(f"paper, 1 CNN, 10 crops (ImageNet): top-1 {100 * paper['top1']:.1f}%, "
                     f"top-5 {100 * paper['top5']:.1f}%; chance here: {100 * summary['chance_top1_error']:.1f}%")
    else:
        lines.append(f"checkpoint: {summary.get('checkpoint')}")
    table = summary.get("transfer")
    for i in range(len((table or {}).get("dataset", []))):
        lines.append(f"transfer {table['dataset'][i]:<10} {table['method'][i]:<8} {table['layer'][i]:<16} "
                     f"{table['metric'][i]} {table['this_run_pct'][i]:.1f}% (+-{table['std_pct'][i]:.1f}; "
                     f"literature {table['literature_pct'][i]:.1f}%, chance {table['chance_pct'][i]:.1f}%)")
    if summary.get("registered_model"):
        m = summary["registered_model"]
        lines.append(f"model: {m['name']} version {m['version']}" + (f" (@{m['alias']})" if m.get("alias") else ""))
    ml = summary["mlflow"]
    lines.append(f"MLflow: parent run {ml['parent_run_id']}, training run {ml['run_id'] or '-'} in experiment "
                 f"{ml['experiment']!r} at {ml['tracking_uri']}")
    lines.append(f"open the UI: {ml['ui']}")
    return "\n".join(lines)


def class_tables(result: dict[str, Any]) -> dict[str, dict[str, list[Any]]]:
    """The per-class error table and the most confused pairs of an ``evaluate_checkpoint`` result, as columns
    (``MlflowClient.log_table``'s ``data``), by artifact name: ``per_class_<split>_<crops>crop.json`` and
    ``confused_pairs_<split>_<crops>crop.json``."""
    suffix = f"{result['split']}_{result['crops']}crop"
    tables = {}
    for key, columns in (("per_class", ("label", "wnid", "words", "images", "top1_err", "top5_err")),
                         ("confused_pairs", ("true_label", "true_wnid", "true_words", "predicted_label",
                                             "predicted_wnid", "predicted_words", "count"))):
        rows = result.get(key) or []
        tables[f"{key}_{suffix}.json"] = {c: [row[c] for row in rows] for c in columns}
    return tables

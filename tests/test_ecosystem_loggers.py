"""W&B (offline) and MLflow (SQLite) with their real libraries, next to TensorBoard and CSV: each logger
gets what it can hold, once, and what it wrote is read back and checked against the lecture's formulas."""

import json
import subprocess
import sys
from collections import Counter, defaultdict

import pytest
import torch
from helpers import (
    GRAD_EDGES,
    TinyNet,
    assert_matches_reference,
    bin_counts,
    loader,
    read_csv,
    read_tensorboard,
    trainer,
)

from lightning_netdiag import DiagnosticPlots, GradDataRatio, HealthReport, SaturationMonitor, UpdateRatio

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

PLOTS = {"activations", "activation_gradients", "activations_over_time", "weight_gradients", "update_ratio"}


@pytest.fixture(scope="module")
def all_four(tmp_path_factory):
    """One run with TensorBoard, W&B, MLflow and CSV loggers at once.

    Returns (model, loggers, HealthReport, W&B history rows, run directory).
    """
    from helpers import read_wandb_history
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    tmp_path = tmp_path_factory.mktemp("loggers")
    patch = pytest.MonkeyPatch()
    patch.setenv("WANDB_MODE", "offline")
    patch.setenv("WANDB_SILENT", "true")
    loggers = {
        "tb": TensorBoardLogger(tmp_path, name="tb"),
        "wandb": WandbLogger(save_dir=str(tmp_path), offline=True, project="netdiag-test"),
        "mlflow": MLFlowLogger(
            experiment_name="netdiag-test",
            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
            artifact_location=str(tmp_path / "mlartifacts"),
        ),
        "csv": CSVLogger(tmp_path, name="csv"),
    }
    model, health = TinyNet(), HealthReport(print_table=False)
    with torch.no_grad():
        model.net[3].weight.mul_(10.0)  # saturate the second Tanh at init: a verdict for the report's table
    callbacks = [
        SaturationMonitor(every_n_steps=2),
        GradDataRatio(every_n_steps=2),
        UpdateRatio(every_n_steps=2),
        DiagnosticPlots(),
        health,
    ]
    with pytest.warns(UserWarning, match="cannot hold histograms"):
        trainer(tmp_path, callbacks, logger=list(loggers.values()), max_steps=5, limit_val_batches=0).fit(
            model, loader()
        )
    wandb.finish()
    patch.undo()
    return model, loggers, health, read_wandb_history(tmp_path), tmp_path


def test_wandb_gets_scalars_histograms_images_and_the_report_table(all_four):
    model, loggers, health, rows, tmp_path = all_four
    ours = [r for r in rows if any(k.startswith("netdiag/") for k in r)]
    # each logging step: one row per callback (3); at the end (step 5) the 5 plots and the report (below), in up to 6
    # rows: one CI run held 4 there (W&B's writer may join rows of one step), 6 in every other run
    steps = Counter(r["trainer/global_step"] for r in ours)
    assert set(steps) == {0, 2, 4, 5} and [steps[s] for s in (0, 2, 4)] == [3, 3, 3] and steps[5] <= 6
    scalars: dict[str, dict[int, float]] = defaultdict(dict)
    for row in ours:
        for tag, value in row.items():
            if isinstance(value, (int, float)) and tag.startswith("netdiag/"):
                assert row["trainer/global_step"] not in scalars[tag], f"{tag} logged twice"
                scalars[tag][row["trainer/global_step"]] = value
    assert assert_matches_reference(scalars, model.ref) > 50
    # histograms: the device-side counts of the non-empty bins, equal to a direct count of the gradient
    hist_rows = [r for r in ours if "netdiag/grad/net.0.weight" in r]
    assert [r["trainer/global_step"] for r in hist_rows] == [0, 2, 4]
    for row in hist_rows:
        h = row["netdiag/grad/net.0.weight"]
        assert h["_type"] == "histogram" and len(h["bins"]) == len(h["values"]) + 1
        full = bin_counts(model.ref_tensors[row["trainer/global_step"]]["netdiag/grad/net.0.weight"], GRAD_EDGES, True)
        used = [i for i, c in enumerate(full) if c > 0]
        assert h["values"] == full[used[0] : used[-1] + 1]
    assert not any(tag.endswith("/q50") for tag in scalars)  # W&B holds histograms: no quantile fallback
    # the plots as images, the report as a table whose rows are the verdicts
    images = {
        k.removeprefix("netdiag/plots/")
        for r in ours
        for k, v in r.items()
        if isinstance(v, dict) and v["_type"] == "image-file"
    }
    assert images == PLOTS
    (table_row,) = [r for r in ours if "netdiag/health_report" in r]
    (table_file,) = tmp_path.glob("wandb/offline-run-*/files/" + table_row["netdiag/health_report"]["path"])
    table = json.loads(table_file.read_text())
    assert table["columns"][:4] == ["severity", "check", "layers", "worst"]
    expected = [[v.check, v.hits, v.layer] for v in health.verdicts]
    assert [row[1:4] for row in table["data"]] == expected and health.verdicts


def test_mlflow_gets_scalars_quantiles_plots_and_the_report(all_four):
    model, loggers, health, _, tmp_path = all_four
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run_id = loggers["mlflow"].run_id
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("netdiag/")]
    logged = {}
    for key in keys:
        history = client.get_metric_history(run_id, key)
        assert len({m.step for m in history}) == len(history), f"{key} logged twice at a step"
        logged[key] = {m.step: m.value for m in history}
    assert assert_matches_reference(logged, model.ref) > 50
    # histograms fall back to quantiles, the same numbers the CSV logger got
    csv = read_csv(f"{loggers['csv'].log_dir}/metrics.csv")
    quantiles = [k for k in keys if k.endswith(("/q05", "/q50", "/q95"))]
    assert "netdiag/grad/net.0.weight/q50" in quantiles and "netdiag/act/net.2/q95" in quantiles
    for key in quantiles:
        assert logged[key] == pytest.approx(csv[key], rel=1e-6), key
    # the plots and the report as artifacts
    files = {a.path for a in client.list_artifacts(run_id, "netdiag/plots")}
    assert files == {f"netdiag/plots/{name}_step5.png" for name in PLOTS}
    (report,) = [a.path for a in client.list_artifacts(run_id, "netdiag") if a.path.endswith(".md")]
    text = (tmp_path / "mlartifacts" / run_id / "artifacts" / report).read_text()
    assert "netdiag health report" in text and all(v.check in text for v in health.verdicts)


def test_tensorboard_and_csv_alongside_get_the_same_numbers(all_four):
    model, loggers, *_ = all_four
    tb, hists, _ = read_tensorboard(loggers["tb"].log_dir)
    assert assert_matches_reference(tb, model.ref) > 50
    assert "netdiag/grad/net.0.weight" in hists and "netdiag/grad/net.0.weight/q50" not in tb
    csv = read_csv(f"{loggers['csv'].log_dir}/metrics.csv")
    assert assert_matches_reference(csv, model.ref) > 50


def test_importing_the_package_imports_neither_wandb_nor_mlflow():
    code = "import sys, lightning_netdiag; print(sorted({'wandb', 'mlflow'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"

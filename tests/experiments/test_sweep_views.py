"""A sweep as people look at it: the PNG plots next to trials.md (choices by name, failed and
pruned trials told apart), TensorBoard's HParams view read over HTTP from a real TensorBoard
server, the report's links to the plots, and the optuna-dashboard command."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from helpers import DEMO, TINY_FIT
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from experiments import sweep_views
from experiments.report import write_report
from experiments.sweep import Param, _outcome, sweep

TINY = TINY_FIT
SPACE = {
    "model.optimizer.lr": {"choices": [0.003, 0.001]},
    "model.peft.init_args.target_modules": {
        "choices": [["q", "v"], ["q", "k", "v", "o", "wi", "wo"], ["nope"]]
    },
}
PNG = b"\x89PNG\r\n\x1a\n"


def synthetic_study() -> tuple[optuna.Study, list[Param]]:
    """Two complete trials, a pruned one and a failed one, as a sweep records them."""
    params = [
        Param.parse(k, v)
        for k, v in {
            **SPACE,
            "model.optimizer.weight_decay": {"low": 0.001, "high": 0.1, "log": True},
        }.items()
    ]
    distributions = {
        "model.optimizer.lr": CategoricalDistribution([0.003, 0.001]),
        "model.peft.init_args.target_modules": CategoricalDistribution(params[1].encoded()),
        "model.optimizer.weight_decay": FloatDistribution(0.001, 0.1, log=True),
    }
    study = optuna.create_study(study_name="views", direction="maximize")
    for state, lr, targets, decay, value, error in [
        (TrialState.COMPLETE, 0.003, ["q", "v"], 0.01, 0.31, None),
        (TrialState.COMPLETE, 0.001, ["q", "k", "v", "o", "wi", "wo"], 0.05, 0.22, None),
        (TrialState.PRUNED, 0.001, ["q", "v"], 0.002, None, None),
        (TrialState.FAIL, 0.003, ["nope"], 0.02, None, "ArgumentError: matches no module"),
    ]:
        values = {"model.optimizer.lr": lr, "model.peft.init_args.target_modules": targets,
                  "model.optimizer.weight_decay": decay}  # fmt: skip
        study.add_trial(
            create_trial(
                state=state,
                value=value,
                params={**values, "model.peft.init_args.target_modules": json.dumps(targets)},
                distributions=distributions,
                user_attrs={"values": values, **({"error": error} if error else {})},
                intermediate_values={0: 0.05} if state == TrialState.PRUNED else {0: value} if value else {},
            )
        )
    return study, params


def test_the_plots_show_choices_by_name_and_tell_failed_and_pruned_trials_apart(tmp_path):
    study, params = synthetic_study()
    written = sweep_views.write_plots(study, params, tmp_path, "val/rougeL", _outcome)
    expected = {"parallel_coordinates", "importances", "history"} | {
        f"slice_{sweep_views.slug(p.key)}" for p in params
    }
    assert set(written) == expected
    assert all(path.read_bytes().startswith(PNG) for path in written.values())

    rows = sweep_views._finished(study, _outcome)
    axes = [
        sweep_views.Axis(p.key, p.choices, p.log, [t.user_attrs["values"][p.key] for t, _, _ in rows])
        for p in params
    ]
    figure = sweep_views._parallel(rows, axes, "val/rougeL", "views", maximize=True)
    ax = figure.axes[0]
    texts = {t.get_text() for t in ax.texts}
    assert {"q,v", "q,k,v,o,wi,wo", "nope", "failed"} <= texts  # choices by name
    styles = {line.get_linestyle() for line in ax.get_lines()}
    assert {"--", ":"} <= styles  # pruned dashed, failed dotted
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert legend == {"complete (colour: objective)", "pruned", "failed"}
    importance = sweep_views._importances(study, params, rows, "val/rougeL")
    assert "FanovaImportanceEvaluator" in importance.axes[0].get_title()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class serve:
    """A server process on a free loopback port (the port is appended to its command), stopped on exit."""

    def __init__(self, command: list[str]) -> None:
        self.command = command

    def __enter__(self) -> int:
        self.port = free_port()
        args = [*self.command, "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self.port

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def get_json(port: int, route: str, ready, seconds: float = 90) -> dict:
    """GET ``route`` until the server answers with a body ``ready`` accepts."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{route}", timeout=10) as response:
                body = json.loads(response.read())
            if ready(body):
                return body
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no answer from http://127.0.0.1:{port}{route}")
        time.sleep(1)


def hparams_over_http(port: int, route: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/data/plugin/hparams/{route}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.e2e
def test_a_sweep_leaves_its_plots_and_tensorboards_hparams_view(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = sweep(base_config=DEMO, space=SPACE, study_name="s", n_trials=3, seed=3, objective="val/loss",
                   direction="minimize", output_dir="sweeps", overrides=TINY)  # fmt: skip
    out = tmp_path / "sweeps/s"
    assert all(Path(p).read_bytes().startswith(PNG) for p in result["plots"].values())
    assert "[parallel coordinates](plots/parallel_coordinates.png)" in (out / "trials.md").read_text()
    printed = capsys.readouterr().out
    assert f"tensorboard --logdir {Path('sweeps/s')}" in printed and "optuna-dashboard sqlite:///" in printed
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'sweeps/s.db'}").trials

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(out), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline, experiment = time.monotonic() + 90, None
        while experiment is None or not experiment.get("hparamInfos"):
            if time.monotonic() > deadline or server.poll() is not None:
                raise AssertionError("TensorBoard did not serve the HParams plugin")
            try:
                experiment = hparams_over_http(port, "experiment", {"experimentName": ""})
            except OSError:
                time.sleep(1)
        names = {info["name"] for info in experiment["hparamInfos"]}
        assert set(SPACE) | {"trial_state"} <= names
        assert {m["name"]["tag"] for m in experiment["metricInfos"]} >= {"sweep/best_val_loss", "val/loss"}
        statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
        groups = hparams_over_http(port, "session_groups", {"experimentName": "", "allowedStatuses": statuses,
                                                           "colParams": [], "startIndex": 0, "sliceSize": 100})  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    sessions = {g["name"]: g for g in groups["sessionGroups"]}
    assert sorted(sessions) == sorted(f"trial_{t.number}" for t in trials)
    for trial in trials:
        group = sessions[f"trial_{trial.number}"]
        for key, value in trial.user_attrs["values"].items():
            assert group["hparams"][key] == (sweep_views.label(value) if isinstance(value, list) else value)
        failed = trial.state == TrialState.FAIL
        assert group["hparams"]["trial_state"] == ("failed" if failed else "complete")
        assert group["sessions"][0]["status"] == ("STATUS_FAILURE" if failed else "STATUS_SUCCESS")
        metrics = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        if not failed:
            assert metrics["sweep/best_val_loss"] == pytest.approx(trial.value)

    executable = Path(sys.executable).with_name("optuna-dashboard")  # peftcore[dashboard]'s console script
    dashboard = serve([str(executable), f"sqlite:///{tmp_path / 'sweeps/s.db'}", "--quiet"])
    with dashboard as port:
        studies = get_json(port, "/api/studies", lambda body: body.get("study_summaries"))
        (study,) = studies["study_summaries"]
        detail = get_json(port, f"/api/studies/{study['study_id']}", lambda body: body.get("trials"))
    assert study["study_name"] == "s" and len(detail["trials"]) == len(trials)

    best = next(t for t in trials if t.state == TrialState.COMPLETE)
    record = {"run": "swept", "metrics": {"rougeL": 0.1},
              "settings": {"ckpt_path": str(out / f"trial_{best.number}/checkpoints/best.ckpt")}}  # fmt: skip
    text = write_report([record], tmp_path / "report")["markdown"].read_text()
    assert "## Sweeps" in text and "(../sweeps/s/plots/parallel_coordinates.png)" in text

"""The workdir layout has one owner (``speculation.workdir``): its paths, its inverse, and the documentation and
Hydra's log directory agreeing with it."""

from __future__ import annotations

from pathlib import Path

from conftest import CONF_DIR
from omegaconf import OmegaConf

from speculation import workdir as layout
from speculation.workdir import Workdir

REPO = Path(__file__).resolve().parents[1]
FILE_NAMES = {name: value for name, value in vars(layout).items() if name.endswith(("_FILE", "_CSV", "_JSON", "_DIR"))}


def test_paths_per_stack():
    workdir = Workdir("outputs/x")
    assert workdir.traces() == Path("outputs/x/traces") and workdir.traces("encoder") == Path(
        "outputs/x/traces/encoder"
    )
    assert workdir.eval() == Path("outputs/x/eval") and workdir.eval("encoder") == Path("outputs/x/eval/encoder")
    assert workdir.run("ctx-seed0") == Path("outputs/x/predictors/ctx-seed0")
    assert workdir.tokenizer == Path("outputs/x/source_model/tokenizer.json")
    for stack in ("decoder", "encoder"):
        assert Workdir.of_traces(workdir.traces(stack)) == workdir


def test_every_file_name_is_in_the_layout_and_in_the_docs():
    tree = layout.__doc__
    docs = (REPO / "docs" / "architecture.md").read_text()
    for name, value in FILE_NAMES.items():
        assert value in tree, f"{name}={value!r} is not in the layout's tree (speculation/workdir.py)"
        assert value in docs, f"{name}={value!r} is not in docs/architecture.md"
    for directory in ("source_model/", "traces/", "predictors/<run>/", "eval/", "logs/", "wandb/"):
        assert directory in tree and directory in docs


def test_hydra_logs_single_runs_under_the_workdirs_logs():
    run_dir = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "hydra" / "default.yaml"))["run"]["dir"]
    assert run_dir.startswith("${workdir}/" + Workdir("").logs.name + "/")

"""The workdir layout: every directory and file name a stage, notebook or error message uses, owned here.

Stages talk only through files under one workdir (``workdir=DIR``, default ``outputs/<experiment name>``)::

    source_model/           the embedded Switch LM, when it was trained here
        config.json             what defines the model (reused only when it matches)
        tokenizer.json          the BPE tokenizer trained on the corpus' train split (tokenizer.meta.json: its settings)
        model.safetensors       written last: marks a finished model
        metrics.json            validation loss next to a unigram baseline
        training_state.pt       only while training (a killed run resumes from it)
    traces/                 one trace store per token stream: the decoder's here ...
        manifest.json           written last: marks a complete store (schema in speculation/traces/manifest.py)
        identity.json           the model and trace config the shards were recorded with
        summary.json            router health per split
        documents.parquet       every traced document, its split and token counts
        router_weights.safetensors   the routers' parameters, for gate-lookahead
        hidden_projection.safetensors   trace.hidden_projection's matrix [H, P] (only when set)
        figures/expert_utilisation.png
        <split>/shard-NNNNN/    <field>.npy + meta.json per shard
        <split>/tokens.parquet  per-token metadata
        encoder/                ... and an encoder-decoder model's encoder stream, a store of its own
    predictors/<run>/       one trained predictor per run
        identity.json           written first: the config and traces it trains on (a rerun must match it)
        predictor.json          written last: marks a finished run (what spec-evaluate loads)
        model.safetensors       the best validation checkpoint
        metrics.json            best validation point, steps, time, parameters
        curves.csv              every loss term at every step
        training_state.pt       only while training
    eval/                   what spec-evaluate writes (eval/encoder/ for the encoder stack)
        metrics.csv, metrics.json, report.md, simulation.csv, simulation.json, engine_validation.csv, figures/
    locks/                  traces.lock, run-<name>.lock, eval-<stack>.lock: who writes what now (speculation/locks.py)
    logs/<stage>/<time>/    Hydra's logs of single runs (conf/hydra/default.yaml)
    wandb/                  offline W&B runs (``wandb sync`` uploads them)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PRIMARY_STACK = "decoder"  # the token stream whose routing a decode step needs; its store is traces/ itself

# source_model/ and predictors/<run>/
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
STATE_FILE = "training_state.pt"
PREDICTOR_FILE = "predictor.json"
CURVES_FILE = "curves.csv"
# traces/
MANIFEST_FILE = "manifest.json"
IDENTITY_FILE = "identity.json"
SUMMARY_FILE = "summary.json"
DOCUMENTS_FILE = "documents.parquet"
ROUTER_WEIGHTS_FILE = "router_weights.safetensors"
PROJECTION_FILE = "hidden_projection.safetensors"  # trace.hidden_projection's matrix, next to the router weights
TOKENS_FILE = "tokens.parquet"
SHARD_META_FILE = "meta.json"
# eval/
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
REPORT_FILE = "report.md"
SIMULATION_CSV = "simulation.csv"
SIMULATION_JSON = "simulation.json"
ENGINE_VALIDATION_CSV = "engine_validation.csv"
FIGURES_DIR = "figures"


@dataclass(frozen=True)
class Workdir:
    """The paths of one workdir (nothing is created until a stage writes)."""

    root: Path

    def __init__(self, root: Path | str) -> None:
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def of_traces(cls, traces_dir: Path | str) -> Workdir:
        """The workdir a trace store belongs to (the inverse of :meth:`traces`)."""
        traces_dir = Path(traces_dir)
        return cls(traces_dir.parent if traces_dir.name == "traces" else traces_dir.parent.parent)

    @property
    def source_model(self) -> Path:
        return self.root / "source_model"

    @property
    def tokenizer(self) -> Path:
        return self.source_model / TOKENIZER_FILE

    def traces(self, stack: str = PRIMARY_STACK) -> Path:
        """The trace store of one token stream."""
        return self.root / "traces" if stack == PRIMARY_STACK else self.root / "traces" / stack

    @property
    def predictors(self) -> Path:
        return self.root / "predictors"

    def run(self, name: str) -> Path:
        """One trained predictor's directory."""
        return self.predictors / name

    def eval(self, stack: str = PRIMARY_STACK) -> Path:
        """What ``spec-evaluate`` writes for one token stream's store."""
        return self.root / "eval" if stack == PRIMARY_STACK else self.root / "eval" / stack

    def lock(self, name: str) -> Path:
        """The lock file of one part of the workdir (``speculation.locks``): traces, run-<name>, eval-<stack>."""
        return self.root / "locks" / f"{name}.lock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

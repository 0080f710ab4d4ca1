"""``hydra/launcher=slurm``: submitit's SLURM launcher, with every job run under ``torchrun``.

Submitit submits one SLURM job per sweep job, with ``nodes`` nodes and one task per node; that task starts
``torchrun --nnodes <nodes> --nproc-per-node <nproc_per_node>`` (rendezvous on the job's first node), which starts
the stage's ranks with this job's overrides. The stage does the rest (``speculation/distributed.py``): a collection
shards its traces over the ranks, a predictor trains data-parallel, and rank 0 writes what they share.
``hydra/launcher=torchrun_local`` does the same on this machine, through submitit's local executor (one node).

The ranks log under the job's own log directory, in ``torchrun/`` (node 0; other nodes in ``torchrun/node-N``),
beside the ``.hydra/`` of the sweep job that ``spec-compare`` reads.
"""

import functools
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import DictConfig

log = logging.getLogger(__name__)
_OWN_KEYS = ("nproc_per_node", "rdzv_port")  # ours, not submitit's: kept out of its executor parameters


@dataclass
class TorchrunSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.spec_torchrun_launcher.launcher.TorchrunSlurmLauncher"
    nproc_per_node: int = 1  # ranks (torchrun workers) per node: one per GPU
    rdzv_port: int = 29500  # the rendezvous port on the job's first node


@dataclass
class TorchrunLocalConf(LocalQueueConf):
    _target_: str = "hydra_plugins.spec_torchrun_launcher.launcher.TorchrunLocalLauncher"
    nproc_per_node: int = 1
    rdzv_port: int = 29500  # unused: one node rendezvous on a free port (torchrun --standalone)


def stage_module(task_function: TaskFunction) -> str:
    """The module ``python -m`` runs for the stage (``train.main``), also when it was started as ``__main__``."""
    module = task_function.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise RuntimeError("a torchrun launcher needs the stage as a module: run its console script or -m")
        module = spec.name
    return module


def first_node(nodelist: str) -> str:
    """The first host of a SLURM node list (``gpu[03-04]`` -> ``gpu03``), which hosts the rendezvous."""
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return hosts.stdout.split()[0]


def torchrun_command(module: str, nproc_per_node: int, rdzv_port: int, overrides: list[str], log_dir: Path,
                     env: dict[str, str]) -> list[str]:  # fmt: skip
    """The torchrun command of one node of a job: its rendezvous from SLURM's variables (one node without them)."""
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    if nodes > 1:
        node = int(env["SLURM_NODEID"])
        rendezvous = [f"--nnodes={nodes}", f"--node-rank={node}", "--rdzv-backend=c10d",
                      f"--rdzv-endpoint={first_node(env['SLURM_JOB_NODELIST'])}:{rdzv_port}",
                      f"--rdzv-id={env.get('SLURM_JOB_ID', 'spec')}"]  # fmt: skip
        log_dir = log_dir if node == 0 else log_dir / f"node-{node}"
    else:
        rendezvous = ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={nproc_per_node}",
            "-m", module, *overrides, f"hydra.run.dir={log_dir}${{rank_dir:}}"]  # fmt: skip


def run_under_torchrun(module: str, nproc_per_node: int, rdzv_port: int, cfg: DictConfig) -> int:
    """The task each sweep job runs on its node: the stage under torchrun, with this job's overrides."""
    hydra_cfg = HydraConfig.get()
    log_dir = Path(hydra_cfg.runtime.output_dir) / "torchrun"
    command = torchrun_command(module, nproc_per_node, rdzv_port, list(hydra_cfg.overrides.task), log_dir,
                               dict(os.environ))  # fmt: skip
    log.info("job %s: %s", hydra_cfg.job.num, " ".join(command))
    done = subprocess.run(command)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exited with {done.returncode}; the ranks' logs are in {log_dir}")
    return done.returncode


class _Torchrun:
    """What both launchers add to submitit's: our keys out of its parameters, the stage under torchrun."""

    def __init__(self, **params: Any) -> None:
        own = {key: params.pop(key) for key in _OWN_KEYS}
        if int(own["nproc_per_node"]) < 1:
            raise ValueError(f"hydra.launcher.nproc_per_node={own['nproc_per_node']} must be >= 1")
        if int(params.get("tasks_per_node", 1)) != 1:
            raise ValueError(
                f"hydra.launcher.tasks_per_node={params['tasks_per_node']}: this launcher starts one torchrun per node "
                "(tasks_per_node=1), which starts the ranks; set hydra.launcher.nproc_per_node instead."
            )
        super().__init__(**params)  # type: ignore[call-arg]
        self.nproc_per_node, self.rdzv_port = int(own["nproc_per_node"]), int(own["rdzv_port"])

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # The job's task is the stage under torchrun, named by its module on the submitting host (where the stage
        # was started); the stage's own function never travels to the node.
        task = functools.partial(run_under_torchrun, stage_module(task_function), self.nproc_per_node, self.rdzv_port)
        super().setup(hydra_context=hydra_context, task_function=task, config=config)  # type: ignore[misc]


class TorchrunSlurmLauncher(_Torchrun, SlurmLauncher):
    pass


class TorchrunLocalLauncher(_Torchrun, LocalLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """One job at a time (submitit's local executor starts them all at once): a job's ranks take every core."""
        results: list[JobReturn] = []
        for offset, overrides in enumerate(job_overrides):
            results += super().launch([overrides], initial_job_idx + offset)
        return results


ConfigStore.instance().store(group="hydra/launcher", name="torchrun_slurm_schema", node=TorchrunSlurmConf,
                             provider="spec_torchrun_launcher")  # fmt: skip
ConfigStore.instance().store(group="hydra/launcher", name="torchrun_local_schema", node=TorchrunLocalConf,
                             provider="spec_torchrun_launcher")  # fmt: skip

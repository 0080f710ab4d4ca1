"""Forward hooks on a model's routers that record each real token's routing, exactly.

Usage::

    with RoutingRecorder(model) as recorder:
        model(tokens_BT, mask_BT)
        arrays = recorder.collect(mask_BT)   # experts [N, L, K], logits [N, L, E], ... of real tokens

Hooks only keep references to the tensors the router already produced (no copies on the forward path), so
tracing costs little more than the forward itself; masking and the move to numpy happen in :meth:`collect`.
Shape legend (docs/glossary.md): N real tokens, L router sites (MoE layers), K experts per token, E experts,
H hidden width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from speculation.config.rules import trace_lookahead_problem
from speculation.errors import UserError
from speculation.traces.store import LOOKAHEAD_FILL, round_hidden
from speculation.tracing.adapters import ModelAdapter, RouterCapture, RouterSite
from speculation.tracing.registry import find_adapter


def random_projection(input_size: int, width: int, seed: int) -> torch.Tensor:
    """``trace.hidden_projection``'s fixed matrix [H, P]: i.i.d. N(0, 1/P) entries drawn from ``seed`` on the CPU
    (Johnson-Lindenstrauss: it keeps inner products of hidden states in expectation). Saved with the traces, so
    reading them never depends on torch's generator staying the same."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(input_size, width, generator=generator) / width**0.5


class RoutingRecorder:
    """Attach to every router site of ``model`` found by its adapter.

    ``hidden_sites`` selects which sites' router inputs are kept (indices into :attr:`sites`; None = all,
    empty = none). The compact options (``trace.*``, docs/architecture.md): ``projection`` = (P, seed) replaces
    the kept hidden states by ``hidden @ projection_HP`` (:func:`random_projection`, [H, P]); ``lookahead`` = D
    adds ``lookahead_logits`` [N, L, D, E], router ``l + d``'s scores of the hidden state entering ``l`` as a
    store of ``hidden_dtype`` rounds it (so they are what gate-lookahead computes from that store's hidden states).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter | None = None,
        hidden_sites: Sequence[int] | None = None,
        stack: str | None = None,
        hidden_dtype: str = "float16",
        lookahead: int = 0,
        projection: tuple[int, int] | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter or find_adapter(model)
        sites = [s for s in self.adapter.sites(model) if stack is None or s.stack == stack]
        if not sites:
            raise UserError(f"no router sites found in {type(model).__name__} (stack={stack!r}).")
        stacks = sorted({site.stack for site in sites})
        if len(stacks) > 1:
            # Each stack reads its own token stream (encoder vs decoder), so their rows cannot share one table.
            raise UserError(f"{type(model).__name__} has routers in stacks {stacks}; record one at a time (stack=...).")
        self.stack = stacks[0]
        self.sites: list[RouterSite] = sites
        all_sites = range(len(self.sites))
        self.hidden_sites = list(all_sites if hidden_sites is None else hidden_sites)
        bad = [i for i in self.hidden_sites if i not in all_sites]
        if bad:
            raise UserError(f"hidden layer indices {bad} are out of range: the model has {len(self.sites)} MoE layers.")
        if problem := trace_lookahead_problem(
            lookahead, len(self.sites), f"the {self.stack} of {type(model).__name__}"
        ):
            raise UserError(problem)
        self.hidden_dtype, self.lookahead, self.projection = hidden_dtype, lookahead, projection
        self.projection_HP = None
        if projection is not None:
            self.projection_HP = random_projection(self.adapter.geometry(model)["d_model"], *projection)
        self._captures: dict[int, tuple[tuple, dict, Any]] = {}
        self._handles: list[Any] = []

    @property
    def layer_labels(self) -> list[str]:
        return [site.label for site in self.sites]

    def __enter__(self) -> RoutingRecorder:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        if self._handles:
            return
        for index, site in enumerate(self.sites):
            self._handles.append(site.module.register_forward_hook(self._make_hook(index, site), with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captures.clear()

    def _make_hook(self, index: int, site: RouterSite):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if index in self._captures:
                raise RuntimeError(
                    f"router {site.label} ran twice before collect(); call collect() after every forward pass."
                )
            # Keep references only: turning the output into a RouterCapture (argmax, slot sorting, ...) waits for
            # collect(), off the forward path.
            self._captures[index] = (args, kwargs, output)

        return hook

    def _lookahead_logits(self, captures: list[RouterCapture]) -> torch.Tensor:
        """[N, L, D, E] float32: entry (l, j) is router ``l + j + 1``'s scores of the hidden state entering ``l``
        (rounded as the store rounds it); ``LOOKAHEAD_FILL`` where ``l + j + 1 >= L``."""
        inputs = [round_hidden(capture.hidden_NH, self.hidden_dtype) for capture in captures]
        num_tokens, num_layers = inputs[0].shape[0], len(self.sites)
        num_experts = captures[0].logits_NE.shape[-1]
        out_NLDE = inputs[0].new_full((num_tokens, num_layers, self.lookahead, num_experts), LOOKAHEAD_FILL)
        for target in range(1, num_layers):
            sources = range(max(0, target - self.lookahead), target)
            # One router call per target layer, on the hidden states of all its source layers at once
            scores = self.adapter.router_scores(self.sites[target], torch.cat([inputs[s] for s in sources]))
            for i, source in enumerate(sources):
                out_NLDE[:, source, target - source - 1] = scores[i * num_tokens : (i + 1) * num_tokens]
        return out_NLDE

    def collect(self, mask_BT: torch.Tensor) -> dict[str, np.ndarray]:
        """Routing of the real tokens of the last forward pass, token-major, then forget it.

        ``mask_BT`` is the bool mask of real tokens of the stack this recorder traces. Returns float32
        logits/gates/hidden (and lookahead_logits), int64 experts and bool dropped, stacked over sites: [N, L, ...].
        """
        missing = [site.label for i, site in enumerate(self.sites) if i not in self._captures]
        if missing:
            raise RuntimeError(f"no router output captured for {missing}; run a forward pass before collect().")
        captures = [self.adapter.capture(site, *self._captures[i]) for i, site in enumerate(self.sites)]
        # A device-mapped model's routers sit on several devices: gather on the host, else stay where they ran
        devices = {capture.logits_NE.device for capture in captures}
        gather = devices.pop() if len(devices) == 1 else torch.device("cpu")
        captures = [capture.to(gather) for capture in captures]
        keep_N = mask_BT.reshape(-1).to(gather)
        for site, capture in zip(self.sites, captures, strict=True):
            if capture.logits_NE.shape[0] != keep_N.numel():
                raise ValueError(
                    f"mask has {keep_N.numel()} positions but router {site.label} saw {capture.logits_NE.shape[0]} "
                    "tokens; pass the mask of the token stream this router reads."
                )
        # Stack over sites first, then mask once: one gather and one device-to-host copy per field.
        fields = {
            "logits": torch.stack([c.logits_NE for c in captures], dim=1).float(),
            "experts": torch.stack([c.experts_NK for c in captures], dim=1).long(),
            "gates": torch.stack([c.gates_NK for c in captures], dim=1).float(),
            "dropped": torch.stack([c.dropped_NK for c in captures], dim=1).bool(),
        }
        if self.hidden_sites:
            hidden_NLH = torch.stack([captures[i].hidden_NH for i in self.hidden_sites], dim=1).float()
            if self.projection_HP is not None:
                hidden_NLH = hidden_NLH @ self.projection_HP.to(hidden_NLH.device)
            fields["hidden"] = hidden_NLH
        if self.lookahead:
            fields["lookahead_logits"] = self._lookahead_logits(captures)
        self._captures.clear()
        if not bool(keep_N.all()):  # full batches (the common case) skip the gather
            rows_N = keep_N.nonzero().squeeze(1)
            fields = {name: value.index_select(0, rows_N) for name, value in fields.items()}
        return {name: value.detach().cpu().numpy() for name, value in fields.items()}

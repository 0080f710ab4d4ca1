"""Forward hooks on a model's routers that record each real token's routing, exactly.

Usage::

    with RoutingRecorder(model) as recorder:
        model(tokens_BT, mask_BT)
        arrays = recorder.collect({"decoder": mask_BT})   # experts [N, L, K], logits [N, L, E], ...

Hooks only keep references to the tensors the router already produced (no copies on the forward path), so
tracing costs little more than the forward itself; masking and the move to numpy happen in :meth:`collect`.
Shape legend: N real tokens, L router sites (MoE layers), K experts per token, E experts, H hidden width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from speculation.tracing.adapters import ModelAdapter, RouterCapture, RouterSite, find_adapter


class RoutingRecorder:
    """Attach to every router site of ``model`` found by its adapter.

    ``hidden_sites`` selects which sites' router inputs are kept (indices into :attr:`sites`; None = all,
    empty = none).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter | None = None,
        hidden_sites: Sequence[int] | None = None,
        stack: str | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter or find_adapter(model)
        sites = self.adapter.sites(model)
        self.sites: list[RouterSite] = [s for s in sites if stack is None or s.stack == stack]
        if not self.sites:
            raise ValueError(f"no router sites found in {type(model).__name__} (stack={stack!r}).")
        all_sites = range(len(self.sites))
        self.hidden_sites = list(all_sites if hidden_sites is None else hidden_sites)
        bad = [i for i in self.hidden_sites if i not in all_sites]
        if bad:
            raise ValueError(
                f"hidden layer indices {bad} are out of range: the model has {len(self.sites)} MoE layers."
            )
        self._captures: dict[int, RouterCapture] = {}
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
            self._captures[index] = self.adapter.capture(site, args, kwargs, output)

        return hook

    def collect(self, masks: dict[str, torch.Tensor] | torch.Tensor) -> dict[str, np.ndarray]:
        """Routing of the real tokens of the last forward pass, token-major, then forget it.

        ``masks`` maps each stack to its bool (B, T) mask of real tokens (a bare tensor means every stack).
        Returns float32 logits/gates/hidden, int64 experts and bool dropped, stacked over sites.
        """
        missing = [site.label for i, site in enumerate(self.sites) if i not in self._captures]
        if missing:
            raise RuntimeError(f"no router output captured for {missing}; run a forward pass before collect().")
        fields: dict[str, list[torch.Tensor]] = {"logits": [], "experts": [], "gates": [], "dropped": [], "hidden": []}
        for index, site in enumerate(self.sites):
            capture = self._captures[index]
            mask = masks if isinstance(masks, torch.Tensor) else masks[site.stack]
            keep_N = mask.reshape(-1).to(capture.logits_NE.device)
            if keep_N.numel() != capture.logits_NE.shape[0]:
                raise ValueError(
                    f"mask has {keep_N.numel()} positions but router {site.label} "
                    f"saw {capture.logits_NE.shape[0]} tokens."
                )
            fields["logits"].append(capture.logits_NE[keep_N].float())
            fields["experts"].append(capture.experts_NK[keep_N].long())
            fields["gates"].append(capture.gates_NK[keep_N].float())
            fields["dropped"].append(capture.dropped_NK[keep_N].bool())
            if index in self.hidden_sites:
                fields["hidden"].append(capture.hidden_ND[keep_N].float())
        self._captures.clear()
        arrays = {name: torch.stack(values, dim=1).detach().cpu().numpy() for name, values in fields.items() if values}
        return arrays

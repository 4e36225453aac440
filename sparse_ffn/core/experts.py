"""Sparse Expansion at inference: routed expert linears (SPEC section 2). Torch only.

    handle = ExpertsHandle(model, ffns, layers)       # counts expert usage over real tokens
    install_layer(handle, ffn, routers, experts)       # swap one FFN's linears for routed experts
    model(ids)                                         # every token runs through the expert of its cluster
    handle.usage()                                     # tokens per expert, per layer and router
    handle.remove()                                    # the dense linears are back

Routing: per decoder layer two routers. Router "in" is fitted on the input x of the first FFN
linear(s) and routes gate_proj and up_proj (or a fused gate_up_proj; for non-gated layouts fc1 /
dense_h_to_4h / c_fc); router "down" is fitted on the input a of down_proj (fc2 / dense_4h_to_h /
c_proj). Each token independently goes to the nearest centroid of its PCA projection; the experts run on
the tokens gathered per cluster, so a token's output does not depend on the other tokens in the batch.
K = 1 needs no router (plain FFN-only SparseGPT). Reading and writing experts: `artifacts.experts`.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

from sparse_ffn.errors import UserError
from sparse_ffn.core.counting import TokenCounter, count_forwards
from sparse_ffn.core.ffn import FFN, check_plain_linear, linear_weight
from sparse_ffn.core.router import Router

ROLES: tuple[str, ...] = ("gate", "up", "gate_up", "down")
ROUTER_OF: dict[str, str] = {"gate": "in", "up": "in", "gate_up": "in", "down": "down"}


def routed_roles(ffn: FFN) -> list[str]:
    """The FFN's linears that get experts, in forward order: gate, up | gate_up | up; then down."""
    return [r for r in ROLES if getattr(ffn, r) is not None]


def router_owner(roles: Iterable[str], router: str) -> str:
    """The role whose module records the usage of `router` (the first one routed by it)."""
    return next(r for r in roles if ROUTER_OF[r] == router)


# ------------------------------------------------------------------------------------------------
# The routed module and its usage counts
# ------------------------------------------------------------------------------------------------

class ExpertUsageStats(TokenCounter):
    """Tokens per expert, per (layer, router), over committed (real) tokens only: the protocol of
    `counting.TokenCounter`, as for `masking.SparsityStats` (so the lm-eval adapter drives both alike).
    Slot = (layer, router), width K (the router's clusters); the values recorded are cluster indices."""

    @property
    def slots(self) -> dict[tuple[int, str], int]:
        """(layer, router) -> K."""
        return self.widths

    def add_slot(self, layer: int, router: str, k: int) -> None:
        self.declare((layer, router), k)

    def record(self, layer: int, router: str, clusters: Tensor) -> None:  # type: ignore[override]
        super().record((layer, router), clusters)

    def _tally(self, slot: tuple[int, str], values: Tensor, weight: Tensor | None) -> Tensor:
        flat = values.reshape(-1).long()
        add = torch.ones_like(flat) if weight is None else weight.reshape(-1)
        return torch.zeros(self.widths[slot], dtype=torch.int64, device=flat.device).scatter_add_(0, flat, add)

    # -- reading ---------------------------------------------------------------------------------
    def counts(self) -> tuple[dict[tuple[int, str], list[int]], int]:
        """({(layer, router): tokens per expert}, tokens counted), as Python ints."""
        return self.totals()

    def summary(self) -> dict:
        """{"tokens", "per_layer": [{"layer", "<router>": [tokens per expert]}], "balance": mean over
        routers of (entropy of the usage / log K), 1 = uniform}."""
        return usage_summary(*self.counts())


def usage_summary(counts: dict[tuple[int, str], list[int]], tokens: int) -> dict:
    """`ExpertUsageStats.summary` from raw counts ({(layer, router): tokens per expert}, tokens counted),
    e.g. summed over server processes."""
    layers: dict[int, dict] = {}
    balance = []
    for (layer, router), c in sorted(counts.items()):
        layers.setdefault(layer, {"layer": layer})[router] = c
        total = sum(c)
        if len(c) > 1 and total:
            p = [x / total for x in c if x]
            balance.append(-sum(x * math.log(x) for x in p) / math.log(len(c)))
    return {"tokens": tokens, "per_layer": list(layers.values()),
            "balance": sum(balance) / len(balance) if balance else None}


class ExpertLinear(nn.Module):
    """Drop-in for one FFN linear: K sparse copies of its weight, one chosen per token by `router`.

    `base_layer` is the dense module it replaced (restored by `remove()`; its bias is used, and
    `find_ffns`/`model_fingerprint` read the dense weight through it, as for a PEFT wrapper).
    `experts` is (K, d_out, d_in) in the dense weight's dtype, or None: an *unloaded* module (layer-streamed
    evaluation) whose experts arrive with `load_` and leave with `unload_`; calling it unloaded is an error.
    """

    def __init__(self, base_layer: nn.Module, router: Router, experts: Tensor | None, *,
                 stats: ExpertUsageStats | None = None, slot: tuple[int, str] | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.router = router  # shared between gate_proj and up_proj of a layer
        self.register_buffer("experts", None, persistent=False)
        self.stats, self.slot = stats, slot
        if experts is not None:
            self.load_(experts)

    def load_(self, experts: Tensor) -> None:
        """Hold `experts` (K, d_out, d_in) (moved to the dense weight's device and dtype; no copy when
        they are there already)."""
        w = linear_weight(self.base_layer)
        if experts.dim() != 3 or tuple(experts.shape[1:]) != tuple(w.shape):
            raise UserError(f"experts of shape {tuple(experts.shape)} do not fit a {tuple(w.shape)} linear")
        if experts.shape[0] != self.router.num_clusters:
            raise UserError(f"{experts.shape[0]} experts for a router with {self.router.num_clusters} clusters")
        self.experts = experts.to(device=w.device, dtype=w.dtype).contiguous()

    def unload_(self) -> None:
        """Drop the experts (the module keeps its router and dense base layer)."""
        self.experts = None

    @property
    def loaded(self) -> bool:
        return self.experts is not None

    @property
    def weight(self) -> Tensor:  # what code that peeks at `.weight` (dtype, device) expects
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def num_experts(self) -> int:
        return self.router.num_clusters if self.experts is None else self.experts.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        if self.experts is None:
            raise UserError("experts not loaded: this model evaluates layer by layer (experts_streaming=True), "
                            "which serves loglikelihood requests only; use the in-memory mode "
                            "(experts_streaming=False) for generation")
        lead, d_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d_in)
        bias = self.bias
        if self.num_experts == 1:
            out = nn.functional.linear(x2, self.experts[0], bias)
            clusters = torch.zeros(x2.shape[0], dtype=torch.long, device=x.device)
        else:
            clusters = self.router.route(x2)
            order = torch.argsort(clusters, stable=True)
            sizes = torch.bincount(clusters, minlength=self.num_experts).tolist()
            xs = x2.index_select(0, order)
            out = x2.new_empty(x2.shape[0], self.experts.shape[1])
            start = 0
            for k, n in enumerate(sizes):
                if n:
                    idx = order[start:start + n]
                    out.index_copy_(0, idx, nn.functional.linear(xs[start:start + n], self.experts[k], bias))
                    start += n
        if self.stats is not None and self.slot is not None:
            self.stats.record(self.slot[0], self.slot[1], clusters.view(lead))
        return out.view(*lead, out.shape[-1])

    def extra_repr(self) -> str:
        d_out, d_in = linear_weight(self.base_layer).shape
        k = self.num_experts
        return f"experts={k}, in_features={d_in}, out_features={d_out}"


def _parent(root: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    for name, module in root.named_modules():
        for cname, c in module.named_children():
            if c is child:
                return module, cname
    raise ValueError("module not found in its layer")


class ExpertsHandle:
    """What `apply_experts_` (or a calibration) installed: `.stats`, `.usage()`, `.remove()`."""

    def __init__(self, model: nn.Module, ffns: list[FFN], layers: nn.ModuleList,
                 manifest: dict | None = None, source: str | None = None) -> None:
        if getattr(model, "_sparse_ffn_experts", None) is not None:
            raise UserError("this model already carries experts; call .remove() on their handle first")
        if getattr(model, "_sparse_ffn_handle", None) is not None:
            raise UserError("apply experts before installing activation masking (sparsify_), not after")
        self.model, self.ffns, self.manifest, self.source = model, ffns, manifest, source
        self.stats = ExpertUsageStats()
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attr, dense module)
        self.layers = layers  # the decoder layers: where each FFN's linears are looked up

        self._hooks = count_forwards(model, self.stats)
        model._sparse_ffn_experts = self

    def install(self, ffn: FFN, routers: dict[str, Router],
                experts: dict[str, Tensor | None]) -> dict[str, ExpertLinear]:
        """Swap each routed linear of `ffn` for an ExpertLinear (routers shared per name); an experts
        entry None installs the module unloaded (see `ExpertLinear.load_`)."""
        roles = routed_roles(ffn)
        missing = [r for r in roles if r not in experts]
        if missing:
            raise UserError(f"layer {ffn.layer}: no experts for {', '.join(missing)}")
        out = {}
        for router_name in {ROUTER_OF[r] for r in roles}:
            self.stats.add_slot(ffn.layer, router_name, routers[router_name].num_clusters)
        for role in roles:
            dense = getattr(ffn, role)
            if isinstance(dense, ExpertLinear):
                raise UserError(f"layer {ffn.layer}: {role} already has experts")
            check_plain_linear(dense, f"layer {ffn.layer} {role}")
            router_name = ROUTER_OF[role]
            owner = router_owner(roles, router_name) == role
            module = ExpertLinear(dense, routers[router_name], experts[role], stats=self.stats,
                                  slot=(ffn.layer, router_name) if owner else None)
            parent, attr = _parent(self.layers[ffn.layer], dense)
            setattr(parent, attr, module)
            self._swapped.append((parent, attr, dense))
            setattr(ffn, role, module)
            out[role] = module
        return out

    def uninstall(self, ffn: FFN) -> None:
        """Put `ffn`'s dense linears back (its usage slots stay); the other layers keep their experts."""
        mine = {id(getattr(ffn, r)) for r in ROLES if isinstance(getattr(ffn, r), ExpertLinear)}
        for entry in [e for e in self._swapped if id(getattr(e[0], e[1])) in mine]:
            parent, attr, dense = entry
            setattr(parent, attr, dense)
            self._swapped.remove(entry)
        for role in ROLES:
            m = getattr(ffn, role)
            if isinstance(m, ExpertLinear):
                setattr(ffn, role, m.base_layer)

    def modules(self, layer: int) -> dict[str, ExpertLinear]:
        """The ExpertLinear modules installed on decoder layer `layer`, by role."""
        f = self.ffns[layer]
        return {r: getattr(f, r) for r in routed_roles(f) if isinstance(getattr(f, r), ExpertLinear)}

    def usage(self) -> dict:
        return self.stats.summary()

    def remove(self) -> None:
        """Put every dense linear back, drop the hooks."""
        for parent, attr, dense in reversed(self._swapped):
            setattr(parent, attr, dense)
        for f in self.ffns:
            for role in ROLES:
                m = getattr(f, role)
                if isinstance(m, ExpertLinear):
                    setattr(f, role, m.base_layer)
        self._swapped.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if getattr(self.model, "_sparse_ffn_experts", None) is self:
            del self.model._sparse_ffn_experts


def check_layer_experts(ffn: FFN, shapes: dict[str, tuple[int, ...]], where: str = "experts") -> None:
    """UserError unless `shapes` ({role: (K, d_out, d_in)}) has every routed linear of `ffn`, each fitting
    the model's linear."""
    for role in routed_roles(ffn):
        if role not in shapes:
            raise UserError(f"{where}: no experts for {role} (layout mismatch)")
        w = linear_weight(getattr(ffn, role))
        if tuple(shapes[role][1:]) != tuple(w.shape):
            raise UserError(f"{where}: {role} experts are {tuple(shapes[role][1:])}, the model's "
                            f"linear is {tuple(w.shape)}")


def install_layer(handle: ExpertsHandle, ffn: FFN, routers: dict[str, Router],
                  experts: dict[str, Tensor], where: str = "experts") -> None:
    """Check the experts against `ffn`'s linears, move them to the linears' device, install them."""
    check_layer_experts(ffn, {r: tuple(t.shape) for r, t in experts.items()}, where)
    handle.install(ffn, _routers_on_device(ffn, routers, where), experts)


def install_layer_unloaded(handle: ExpertsHandle, ffn: FFN, routers: dict[str, Router],
                           shapes: dict[str, tuple[int, ...]], where: str = "experts") -> None:
    """`install_layer` without the expert weights: the routed modules are in place (routers, usage
    slots, room for the masking hooks) and get their (K, d_out, d_in) experts later (`ExpertLinear.load_`)."""
    check_layer_experts(ffn, shapes, where)
    handle.install(ffn, _routers_on_device(ffn, routers, where), {r: None for r in shapes})


def _routers_on_device(ffn: FFN, routers: dict[str, Router], where: str) -> dict[str, Router]:
    device = linear_weight(ffn.down).device
    if device.type == "meta":
        raise UserError(f"{where}: the model's FFN weights are offloaded (meta device); experts need them in "
                        f"memory: load the model without offloading (a device_map over real devices)")
    return {k: r.to(device) for k, r in routers.items()}

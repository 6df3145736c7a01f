"""PyTorch re-statements of the released adapters, the references of tests/test_released_*.py.

Written from the released code, keeping its computation step by step (not its text):
- `DepthMoE` of daxichen/SpectralMoE-main `SpectralMoE/models/backbones/depthmoe.py` (HEAD
  6c6a5e7): `forward` (DINOv3 prefix split, depth cls dropped), `forward_delta_feat`,
  `noisy_top_k_gating` with `gating='laplace'` (every released config), `_prob_in_top_k`,
  `cv_squared`, `return_auto`, and its `SparseDispatcher` (dispatch, and `combine` as called:
  without `multiply_by_gates`);
- `Reins` / `LoRAReins` of w1oves/Rein `rein/models/backbones/reins.py` (`forward` with
  `batch_first=True, has_cls_token=True` as `ReinsDinoVisionTransformer` calls it).

The modules hold their parameters under the released names, so `load_state_dict(strict=True)`
checks that the test state dicts use exactly the released keys. Gate noise is injected: the
released `torch.randn_like` is replaced by values the test pops from `noise` in call order
(visual, then depth, per layer).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ReleasedDispatcher:
    """`SparseDispatcher`: rows grouped by expert, and the ungated log-space combine."""

    def __init__(self, num_experts: int, gates: torch.Tensor):
        self.rows_total = gates.shape[0]
        nonzero = torch.nonzero(gates)  # [(row, expert)] with gate != 0, row-major
        by_expert, order = nonzero.sort(0)
        self.expert_index = by_expert[:, 1:2]
        self.row_index = nonzero[order[:, 1], 0]
        self.part_sizes = (gates > 0).sum(0).tolist()
        self.nonzero_gates = torch.gather(gates[self.row_index], 1, self.expert_index)

    def dispatch(self, x: torch.Tensor):
        return torch.split(x[self.row_index], self.part_sizes, dim=0)

    def combine(self, expert_out, multiply_by_gates: bool = False) -> torch.Tensor:
        stitched = torch.cat(expert_out, 0).exp()
        if multiply_by_gates:
            stitched = stitched * self.nonzero_gates
        out = torch.zeros(self.rows_total, expert_out[-1].shape[1], dtype=stitched.dtype)
        out = out.index_add(0, self.row_index, stitched.float())
        out[out == 0] = np.finfo(float).eps
        return out.log()


class ReleasedDepthMoE(nn.Module):
    def __init__(self, num_layers, embed_dims, num_experts, rank, token_length, query_dims,
                 top_k, num_prefix=5):
        super().__init__()
        self.num_layers, self.embed_dims, self.num_experts = num_layers, embed_dims, num_experts
        self.top_k, self.num_prefix = top_k, num_prefix
        empty = lambda *shape: nn.Parameter(torch.zeros(*shape))  # noqa: E731 - loaded, not trained
        per_layer = lambda make: nn.ModuleList(  # noqa: E731
            [nn.ParameterList(make()) for _ in range(num_layers)])
        self.experts_a = per_layer(lambda: [empty(token_length, rank) for _ in range(num_experts)])
        self.experts_b = per_layer(lambda: [empty(rank, embed_dims) for _ in range(num_experts)])
        self.w_gate = per_layer(lambda: [empty(embed_dims, num_experts) for _ in range(2)])
        self.w_noise = per_layer(lambda: [empty(embed_dims, num_experts) for _ in range(2)])
        self.register_buffer("mean", torch.tensor([0.0]))
        self.register_buffer("std", torch.tensor([1.0]))
        self.scale = nn.Parameter(torch.tensor(1e-3))
        self.mlp_token2feat = nn.Linear(embed_dims, embed_dims)
        self.mlp_delta_f = nn.Linear(embed_dims, embed_dims)
        self.transform = nn.Linear(embed_dims, query_dims)
        self.merge = nn.Linear(3 * query_dims, query_dims)
        self.noise: list[torch.Tensor] = []  # injected eps, consumed in call order

    # --- tokens and queries ---
    def tokens(self, layer, expert):
        return self.experts_a[layer][expert] @ self.experts_b[layer][expert]

    def all_tokens(self):  # [L, m, d]: the mean over experts per layer
        return torch.stack([torch.stack([self.tokens(l, e) for e in range(self.num_experts)]).mean(0)
                            for l in range(self.num_layers)])

    def return_auto(self):
        t = self.transform(self.all_tokens()).permute(1, 2, 0)  # [m, q, L]
        t = torch.cat([F.max_pool1d(t, kernel_size=self.num_layers),
                       F.avg_pool1d(t, kernel_size=self.num_layers), t[:, :, -1:]], dim=-1)
        return self.merge(t.flatten(-2, -1))

    # --- gating ---
    @staticmethod
    def cv_squared(x):
        if x.shape[0] == 1:
            return torch.zeros(1, dtype=x.dtype)
        return x.float().var() / (x.float().mean() ** 2 + 1e-10)

    def prob_in_top_k(self, clean, noisy, std, top_values):
        rows, m = clean.shape[0], top_values.shape[1]
        flat = top_values.flatten()
        in_pos = torch.arange(rows) * m + self.top_k
        threshold_in = flat[in_pos].unsqueeze(1)
        threshold_out = flat[in_pos - 1].unsqueeze(1)
        normal = torch.distributions.normal.Normal(self.mean, self.std)
        return torch.where(noisy > threshold_in, normal.cdf((clean - threshold_in) / std),
                           normal.cdf((clean - threshold_out) / std))

    def gate(self, x, layer, modality):
        clean = -torch.cdist(x, self.w_gate[layer][modality].t())  # gating='laplace'
        std = noisy = None
        logits = clean
        if self.training:
            std = F.softplus(x @ self.w_noise[layer][modality]) + 1e-2
            noisy = clean + self.noise.pop(0) * std
            logits = noisy
        k = self.top_k
        top_values, top_index = logits.topk(min(k + 1, self.num_experts), dim=1)
        top_k = top_values[:, :k]
        weights = torch.exp(top_k - torch.logsumexp(top_k, dim=1, keepdim=True))
        gates = torch.zeros_like(logits).scatter(1, top_index[:, :k], weights)
        if self.training and k < self.num_experts:
            load = self.prob_in_top_k(clean, noisy, std, top_values).sum(0)
        else:
            load = (gates > 0).sum(0)
        return gates, load

    # --- the refinement ---
    def expert_outputs(self, x, gates, layer):
        dispatcher = ReleasedDispatcher(self.num_experts, gates)
        outputs = []
        for e, rows in enumerate(dispatcher.dispatch(x)):
            if len(rows) == 0:
                outputs.append(torch.empty(0, self.embed_dims))
                continue
            tokens = self.tokens(layer, e)
            attn = torch.einsum("bc,td->bt", rows, tokens) * self.embed_dims ** -0.5
            attn = attn.softmax(-1)
            outputs.append(torch.einsum("bt,td->bd", attn[:, 1:], self.mlp_token2feat(tokens[1:])))
        return dispatcher.combine(outputs)

    def delta_feat(self, msi, depth, layer):
        b, n, d = msi.shape
        msi_flat, depth_flat = msi.reshape(-1, d), depth.reshape(-1, d)
        msi_gates, msi_load = self.gate(msi_flat, layer, 0)
        depth_gates, depth_load = self.gate(depth_flat, layer, 1)
        loss = 1e3 * (self.cv_squared(msi_gates.sum(0)) + self.cv_squared(msi_load)
                      + self.cv_squared(depth_gates.sum(0)) + self.cv_squared(depth_load))
        msi_out = self.expert_outputs(msi_flat, msi_gates, layer).reshape(b, n, d)
        depth_out = self.expert_outputs(depth_flat, depth_gates, layer).reshape(b, n, d)
        attn = torch.einsum("bnc,bmc->bnm", depth_out, msi_out) * self.embed_dims ** -0.5
        fused = torch.einsum("bnn,bnc->bnc", attn.softmax(-1), msi_out)
        return self.mlp_delta_f(fused + msi), loss

    def forward(self, feats, depth_features, layer):
        """feats [B, P + N, d] with the VFM's P prefix tokens; depth_features [B, 1 + N, d]."""
        prefix, feats = feats[:, :self.num_prefix], feats[:, self.num_prefix:]
        depth_features = depth_features[:, 1:]
        delta, loss = self.delta_feat(feats, depth_features, layer)
        return torch.cat([prefix, feats + delta * self.scale], dim=1), loss


class ReleasedLoRAReins(nn.Module):
    def __init__(self, num_layers, embed_dims, rank, token_length, query_dims):
        super().__init__()
        self.num_layers, self.embed_dims = num_layers, embed_dims
        self.learnable_tokens_a = nn.Parameter(torch.zeros(num_layers, token_length, rank))
        self.learnable_tokens_b = nn.Parameter(torch.zeros(num_layers, rank, embed_dims))
        self.scale = nn.Parameter(torch.tensor(1e-3))
        self.mlp_token2feat = nn.Linear(embed_dims, embed_dims)
        self.mlp_delta_f = nn.Linear(embed_dims, embed_dims)
        self.transform = nn.Linear(embed_dims, query_dims)
        self.merge = nn.Linear(3 * query_dims, query_dims)

    def tokens(self, layer=-1):
        if layer == -1:
            return self.learnable_tokens_a @ self.learnable_tokens_b
        return self.learnable_tokens_a[layer] @ self.learnable_tokens_b[layer]

    def return_auto(self):
        t = self.transform(self.tokens()).permute(1, 2, 0)
        t = torch.cat([F.max_pool1d(t, kernel_size=self.num_layers),
                       F.avg_pool1d(t, kernel_size=self.num_layers), t[:, :, -1:]], dim=-1)
        return self.merge(t.flatten(-2, -1))

    def forward(self, feats, layer):
        """`forward(feats, layer, batch_first=True, has_cls_token=True)`: [B, 1 + N, d]."""
        feats = feats.permute(1, 0, 2)  # tokens first, as the released einsums index them
        cls, feats = feats[:1], feats[1:]
        tokens = self.tokens(layer)
        attn = torch.einsum("nbc,mc->nbm", feats, tokens) * self.embed_dims ** -0.5
        attn = attn.softmax(-1)
        delta = torch.einsum("nbm,mc->nbc", attn[:, :, 1:], self.mlp_token2feat(tokens[1:]))
        delta = self.mlp_delta_f(delta + feats)
        return torch.cat([cls, feats + delta * self.scale], dim=0).permute(1, 0, 2)


def load_released(module: nn.Module, state: dict, prefix: str) -> nn.Module:
    """Loads the `prefix`-ed keys of a numpy state dict, strictly (every key, no extra)."""
    own = {k[len(prefix):]: torch.from_numpy(np.asarray(v)) for k, v in state.items()
           if k.startswith(prefix)}
    module.load_state_dict(own, strict=True)
    return module


def torch_float(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x, np.float32))


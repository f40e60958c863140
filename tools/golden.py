# ruff: noqa: E501  (a table of cases, one per line)
"""Golden outputs for the redesign: masks and weights of many configurations, compared bitwise.

python tools/golden.py save OUT.pt   # on the code before a refactor step
python tools/golden.py check OUT.pt   # after: every case equal (prints the max weight difference per case)
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning, prune  # noqa: E402


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


def mlp_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8 * 16, 16, generator=g)
    w = torch.randn(16, 4, generator=g)
    y = (x @ w).argmax(1)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(x), 16)]


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def lm_data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 16), generator=g)
    return [{"input_ids": ids.roll(i, 1), "labels": ids.roll(i, 1)} for i in range(6)]


SEQ = dict(allocation="reconstruction", scope="layer", blocks="auto")
CASES = {
    # name: (model, data, loss_fn, factory)
    "mag": ("mlp", lambda: MagnitudePruning(0.7, verbose=0)),
    "mag-layer-24": ("mlp", lambda: MagnitudePruning(0.5, pattern="2:4", verbose=0)),
    "mag-channels": ("mlp", lambda: MagnitudePruning(0.5, pattern="channels", scope="layer", verbose=0)),
    "obd-fisher": ("mlp", lambda: OBDPruning(0.7, fisher_type="empirical", num_batches=8, verbose=0)),
    "obd-fisher-exact": ("mlp", lambda: OBDPruning(0.7, fisher_type="exact", num_batches=8, verbose=0)),
    "obd-fisher-mc": ("mlp", lambda: OBDPruning(0.7, fisher_type="mc", num_batches=8, verbose=0)),
    "obd-kfac": ("mlp", lambda: OBDPruning(0.7, curvature="kfac", fisher_type="empirical", num_batches=8, verbose=0)),
    "obd-ekfac": ("mlp", lambda: OBDPruning(0.7, curvature="ekfac", fisher_type="empirical", num_batches=8, verbose=0)),
    "obd-hutch": ("mlp", lambda: OBDPruning(0.7, curvature="hutchinson", num_probes=2, num_batches=4, verbose=0)),
    "obd-act": ("mlp", lambda: OBDPruning(0.7, curvature="activations", scope="row", num_batches=8, verbose=0)),
    "obd-channels": ("mlp", lambda: OBDPruning(0.5, pattern="channels", scope="layer", fisher_type="empirical", num_batches=8, verbose=0)),
    "obs-default": ("mlp", lambda: OBSPruning(0.8, num_batches=8, verbose=0)),
    "obs-fisher-alloc": ("mlp", lambda: OBSPruning(0.8, allocation="fisher", num_batches=8, verbose=0)),
    "obs-kfac-alloc": ("mlp", lambda: OBSPruning(0.8, allocation="kfac", num_batches=8, verbose=0)),
    "obs-current": ("mlp", lambda: OBSPruning(0.8, reconstruct="current", num_batches=8, verbose=0)),
    "obs-blocked": ("mlp", lambda: OBSPruning(0.8, solver="blocked", block_size=8, num_batches=8, verbose=0)),
    "obs-fast": ("mlp", lambda: OBSPruning(0.8, solver="fast", block_size=8, num_batches=8, verbose=0)),
    "obs-recon": ("mlp", lambda: OBSPruning(0.6, allocation="reconstruction", scope="layer", num_batches=8, verbose=0)),
    "obs-24": ("mlp", lambda: OBSPruning(0.5, pattern="2:4", num_batches=8, verbose=0)),
    "obs-channels": ("mlp", lambda: OBSPruning(0.5, pattern="channels", scope="layer", num_batches=8, verbose=0)),
    "obs-wood": ("mlp", lambda: OBSPruning(0.8, hessian="fisher", block_size=16, num_batches=8, verbose=0)),
    "obs-kfac": ("mlp", lambda: OBSPruning(0.8, hessian="kfac", num_batches=8, verbose=0)),
    "obs-kfac-24": ("mlp", lambda: OBSPruning(0.5, hessian="kfac", pattern="2:4", num_batches=8, verbose=0)),
    "lm-sgpt": ("llama", lambda: OBSPruning(0.5, solver="fast", reconstruct="current", num_batches=6, verbose=0, **SEQ)),
    "lm-sgpt-orig": ("llama", lambda: OBSPruning(0.5, solver="fast", num_batches=6, verbose=0, **SEQ)),
    "lm-obc": ("llama", lambda: OBSPruning(0.5, solver="exact", reconstruct="current", num_batches=6, verbose=0, **SEQ)),
    "lm-sgpt-24": ("llama", lambda: OBSPruning(0.5, solver="fast", reconstruct="current", pattern="2:4", num_batches=6, verbose=0, **SEQ)),
    "lm-wanda": ("llama", lambda: OBDPruning(0.5, curvature="activations", scope="row", num_batches=6, verbose=0)),
    "lm-obs-default": ("llama", lambda: OBSPruning(0.5, allocation="auto", num_batches=6, verbose=0)),  # whole-model
    "lm-obs-prune-default": ("llama", lambda: OBSPruning(0.5, num_batches=6, verbose=0)),  # prune(): block by block
    "lm-obd-mc": ("llama", lambda: OBDPruning(0.5, num_batches=6, verbose=0)),
    "lm-channels-obs": ("llama", lambda: OBSPruning(0.5, pattern="channels", scope="layer", num_batches=6, verbose=0)),
    "lm-mag": ("llama", lambda: MagnitudePruning(0.5, verbose=0)),
}  # fmt: skip


def run(name):
    kind, factory = CASES[name]
    model = mlp() if kind == "mlp" else llama()
    data = mlp_data() if kind == "mlp" else lm_data()
    pruner = factory()
    rec = prune(model, data, pruner, loss_fn=ce if kind == "mlp" else None)
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: m.clone() for n, m in pruner.masks.items()},
        rec,
    )


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    only = sys.argv[3].split(",") if len(sys.argv) > 3 else list(CASES)
    if mode == "save":
        out = {}
        for name in only:
            w, m, rec = run(name)
            out[name] = (w, m, rec["predicted_loss_increase"])
            print(name, rec["sparsity"], flush=True)
        torch.save(out, path)
    else:
        ref = torch.load(path, weights_only=False)
        bad = 0
        for name in only:
            if name not in ref:
                print(f"new {name}: not in {path}, not compared")
                continue
            w, m, rec = run(name)
            rw, rm, rp = ref[name]
            mask_eq = set(m) == set(rm) and all(torch.equal(m[k], rm[k]) for k in m)
            diff = max((w[k].float() - rw[k].float()).abs().max().item() for k in w)
            ok = mask_eq and diff == 0.0
            bad += not ok
            print(
                f"{'ok ' if ok else 'BAD'} {name}: masks {'equal' if mask_eq else 'DIFFER'}, max weight diff {diff:.3g}, predicted {rec['predicted_loss_increase']!r} vs {rp!r}",
                flush=True,
            )
        print("all equal" if not bad else f"{bad} cases differ")

"""FSDP2 training jobs for tests/test_fsdp.py (run as a script: Lightning relaunches it per rank).

    python tests/fsdp_job.py --devices 2 --method obs --out DIR [--lr 0] [--resume CKPT] [--epochs 4]
    python tests/fsdp_job.py --selection --out DIR        # under torch.distributed.run: sharded selection
    python tests/fsdp_job.py --devices 2 --method magnitude --distill copy --out DIR   # a Distillation beside it

``--devices 2``: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with
``fully_shard`` on every Linear and on the model (weights are DTensors, rows split between the
two ranks); ``--devices 1``: the same model unsharded in one process, the reference. Both see the
same samples per step (rank r: samples r, r + 2, ...; one process: all of them, batch twice as
big). Each rank writes DIR/rank{R}.pt with the whole-layer masks and weights (gathered), the
history, the local mask shapes and the peak extra bytes a round held. ``--distill copy|module|path``
adds a ``Distillation`` whose teacher is the default copy, the dense model passed as a module, or its
state dict saved to a file; the rank's file then also holds the teacher (gathered), its local and
full sizes, the last step's terms and the dense model at fit start.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl
import torch
from ddp_job import OrderedTinyNet, exit_cleanly
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_prune import Distillation, MagnitudePruning, OBDPruning, OBSPruning
from lightning_prune.runtime import sharding

METHODS = {
    "magnitude": lambda a: MagnitudePruning(0.8, verbose=0, scope=a.scope),
    "obd": lambda a: OBDPruning(0.8, curvature="fisher", fisher_type="empirical", num_batches=4, verbose=0),
    "obd_exact": lambda a: OBDPruning(0.8, curvature="fisher", num_batches=4, verbose=0),
    "obd_kfac": lambda a: OBDPruning(0.8, curvature="kfac", fisher_type="empirical", num_batches=4, verbose=0),
    "obs": lambda a: OBSPruning(0.8, num_batches=4, verbose=0, scope=a.scope),
    "obs_layer": lambda a: OBSPruning(0.8, scope="layer", num_batches=4, verbose=0),
    "obs_kfac": lambda a: OBSPruning(0.8, hessian="kfac", num_batches=4, verbose=0),
    "obs_fisher": lambda a: OBSPruning(0.8, hessian="fisher", block_size=8, num_batches=4, verbose=0),
    "obs_nm": lambda a: OBSPruning(0.5, pattern="2:4", num_batches=4, verbose=0),
}


class ShardedTinyNet(OrderedTinyNet):
    """ddp_job's ordered TinyNet with FSDP2 applied in ``configure_model`` (one ``fully_shard`` per Linear, then
    the root)."""

    def configure_model(self) -> None:
        if not getattr(self, "_sharded", False) and torch.distributed.is_initialized():
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for m in self.net:
                if isinstance(m, torch.nn.Linear):
                    fully_shard(m, mesh=mesh)
            fully_shard(self, mesh=mesh)
            self._sharded = True


def moments_at_pruned(trainer: pl.Trainer, pruner) -> float:
    """Largest |optimizer moment| at a pruned entry of this rank's shards (must be exactly 0)."""
    worst = 0.0
    by_id = {id(t.param): t.name for t in pruner.targets}
    for opt in trainer.optimizers:
        for p, state in opt.state.items():
            name = by_id.get(id(p))
            for v in state.values() if name else ():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    pruned = sharding.local(v)[~pruner.current_masks()[name]]
                    worst = max(worst, float(pruned.abs().max()) if pruned.numel() else 0.0)
    return worst


def train(a: argparse.Namespace) -> None:
    pl.seed_everything(0, verbose=False)
    batch = 16 if a.devices > 1 else 32  # the same samples per step
    model = ShardedTinyNet(batch_size=batch, lr=a.lr, n=256, hidden=28, classes=5)  # 5 rows: uneven shards 3/2
    pruner = METHODS[a.method](a)
    callbacks = [pruner, ModelCheckpoint(dirpath=os.path.join(a.out, "ckpt"), filename="{epoch}", save_top_k=-1)]
    distill, dense = None, {n: p.detach().clone() for n, p in model.net.named_parameters()}
    if a.distill:
        teacher = {"copy": lambda: None, "module": lambda: copy.deepcopy(model.net)}.get(a.distill)
        if teacher is None:  # "path": the dense student module's state dict, one file per rank (no race)
            path = os.path.join(a.out, f"teacher{os.environ.get('LOCAL_RANK', '0')}.pt")
            torch.save(model.net.state_dict(), path)
            teacher = lambda: path  # noqa: E731
        distill = Distillation(teacher=teacher(), kd_weight=1.0, temperature=2.0)
        callbacks.append(distill)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=a.devices,
        strategy=ModelParallelStrategy(data_parallel_size=a.devices, tensor_parallel_size=1) if a.fsdp else "auto",
        max_epochs=a.epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        use_distributed_sampler=False,
    )
    trainer.fit(model, ckpt_path=a.resume)
    targets = pruner.targets
    torch.save(
        {
            "masks": pruner.full_masks(),
            "weights": {t.name: sharding.gather(t.param).cpu() for t in targets},
            "local_shapes": {n: tuple(m.shape) for n, m in pruner.current_masks().items()},
            "sharded": [t.sharded for t in targets],
            "history": [dict(r) for r in pruner.history],
            "world": trainer.world_size,
            "moments_at_pruned": moments_at_pruned(trainer, pruner),
            **({**distilled(distill), "dense": dense, "state_keys": list(model.state_dict())} if distill else {}),
        },
        os.path.join(a.out, f"rank{trainer.global_rank}.pt"),
    )


def distilled(distill: Distillation) -> dict:
    """The teacher (whole tensors, gathered), each tensor's local and full sizes, and the last step's terms."""
    teacher = distill.teacher
    assert teacher is not None
    return {
        "teacher": {n: sharding.gather(p).cpu() for n, p in teacher.named_parameters()},
        "teacher_local": {n: sharding.local(p).numel() for n, p in teacher.named_parameters()},
        "teacher_numel": {n: p.numel() for n, p in teacher.named_parameters()},
        "teacher_frozen": not any(p.requires_grad for p in teacher.parameters()) and not teacher.training,
        "terms": {k: float(v) for k, v in distill.last_terms.items()},
    }


def selection(a: argparse.Namespace) -> None:
    """Sharded ``select_masks`` on rows split between ranks against one process on whole layers."""
    import torch.distributed as dist

    from lightning_prune.engine.selection import Shards, UnreachableSparsity
    from lightning_prune.patterns import NM, parse_pattern
    from lightning_prune.runtime.distributed import TorchDistributed

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for case in range(24):
        g = torch.Generator().manual_seed(case)
        shapes = {"a": (7, 8), "b": (5, 8), "c": (3, 4)}  # "c" is held whole by every rank
        scores = {n: torch.randint(0, 4 if case % 2 else 1000, s, generator=g).double() for n, s in shapes.items()}
        if case % 3 == 0:
            scores["a"][0, :3] = float("nan")
        masks = {n: torch.rand(s, generator=g) > 0.2 for n, s in shapes.items()}
        scope = ["global", "layer"][case % 2]
        sparsity = [0.3, 0.6, 0.85][case % 3]
        pattern = parse_pattern("unstructured")
        if case >= 18:  # 2:4 (groups ramp too), from dense masks
            pattern = NM(2, 4) if case % 2 else NM(2, 4, ramp="groups")
            masks = {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}
            sparsity = 0.5 * (case - 17) / 6
        min_density = [0.0, 0.2, 0.5][(case // 2) % 3]

        def run(sc, ms, shards):
            try:
                return pattern.select(sc, ms, sparsity, scope=scope, min_density=min_density, shards=shards)
            except UnreachableSparsity:
                return "unreachable"

        full = run(scores, masks, None)
        rows = {n: torch.tensor_split(torch.arange(s[0]), world)[rank] for n, s in shapes.items() if n != "c"}
        local_scores = {n: (s[rows[n]] if n in rows else s) for n, s in scores.items()}
        local_masks = {n: (m[rows[n]] if n in rows else m) for n, m in masks.items()}
        shards = Shards(
            TorchDistributed(),
            {n: rank if n in rows else 0 for n in shapes},
            {n: n in rows or rank == 0 for n in shapes},
        )
        part = run(local_scores, local_masks, shards)
        if full == "unreachable" or part == "unreachable":
            results.append((case, full == part))
        else:
            results.append(
                (case, all(torch.equal(part[n], full[n][rows[n]] if n in rows else full[n]) for n in shapes))
            )
    torch.save(results, os.path.join(a.out, f"selection{rank}.pt"))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--method", default="obs")
    p.add_argument("--scope", default="global")
    p.add_argument("--out", required=True)
    p.add_argument("--lr", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--resume", default=None)
    p.add_argument("--selection", action="store_true")
    p.add_argument("--distill", choices=["copy", "module", "path"], default=None, help="a Distillation's teacher")
    p.add_argument("--fsdp", type=int, default=None, help="ModelParallelStrategy (default: with --devices > 1)")
    a = p.parse_args()
    a.fsdp = a.devices > 1 if a.fsdp is None else bool(a.fsdp)
    if a.selection:
        selection(a)
    else:
        train(a)
        exit_cleanly()


if __name__ == "__main__":
    main()

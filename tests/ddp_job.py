"""A small multi-process training job for the DDP tests (run as a script: Lightning relaunches it per rank).

    python tests/ddp_job.py --devices 2 --method obs --out DIR [--batch 16] [--lr 0] [--chaos] [--resume CKPT]
    python tests/ddp_job.py --devices 2 --window-resume --out DIR
    python tests/ddp_job.py --devices 2 --method magnitude --distill --out DIR   # a Distillation beside it

Each rank writes DIR/rank{R}.pt with its final masks, pruned weights, the last round's curvature
diagonals and the result of an all_gather check made after every round. ``--window-resume`` runs
step rounds with a checkpoint after every step, then resumes from each checkpoint taken inside the
first round's capture window, in the same processes, and writes every run's masks, weights and
what each round's criterion was given on this rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl
import torch
from conftest import TinyNet
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_prune import Distillation, MagnitudePruning, OBDPruning, OBSPruning


def spy(cls):
    class Spy(cls):
        """Keeps the curvature diagonals each round's criterion was given."""

        diagonals: typing.ClassVar[dict] = {}

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            prune = self.criterion.prune

            def spying(ctx):
                est = ctx.stats
                if est is not None and hasattr(est, "parts"):
                    est = est.parts["kfac"]
                if est is not None:
                    self.diagonals = {t.name: est.diagonal(t.name).cpu() for t in ctx.targets}
                return prune(ctx)

            self.criterion.prune = spying

    return Spy


METHODS = {
    "magnitude": lambda a: spy(MagnitudePruning)(0.8, verbose=1),
    "obd": lambda a: spy(OBDPruning)(0.8, curvature="fisher", num_batches=a.num_batches, verbose=1),
    "obd_kfac": lambda a: spy(OBDPruning)(0.8, curvature="kfac", num_batches=a.num_batches, verbose=1),
    "obd_ekfac": lambda a: spy(OBDPruning)(0.8, curvature="ekfac", num_batches=a.num_batches, verbose=1),
    "obs": lambda a: spy(OBSPruning)(0.8, num_batches=a.num_batches, verbose=1),
    "obs_kfac": lambda a: spy(OBSPruning)(0.8, hessian="kfac", num_batches=a.num_batches, verbose=1),
}


class OrderedTinyNet(TinyNet):
    """Same data order as one process: rank r gets samples r, r + world, ... (no shuffling)."""

    def train_dataloader(self):
        loader = super().train_dataloader()
        if not torch.distributed.is_initialized():
            return loader
        sampler = torch.utils.data.DistributedSampler(loader.dataset, shuffle=False)
        return torch.utils.data.DataLoader(loader.dataset, batch_size=self.hparams.batch_size, sampler=sampler)


class Chaos(Callback):
    """Rank-dependent noise on the weights right before each round: only a sync can undo it."""

    def __init__(self, pruner):
        self.pruner, self.diverged = pruner, []

    def on_train_epoch_end(self, trainer, pl_module):
        if self.pruner.schedule.is_round(trainer.current_epoch):
            g = torch.Generator().manual_seed(1000 + trainer.global_rank)
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.add_(1e-3 * torch.randn(p.shape, generator=g))
            w = pl_module.all_gather(next(pl_module.parameters()).detach())
            self.diverged.append(not torch.equal(w[0], w[1]))


class GatherCheck(Callback):
    """After every round: all_gather masks and pruned weights and compare ranks bitwise."""

    def __init__(self, pruner):
        self.pruner, self.checks = pruner, []

    def on_train_epoch_end(self, trainer, pl_module):
        if len(self.pruner.history) == len(self.checks):
            return
        params = dict(pl_module.named_parameters())
        same = True
        for name, mask in self.pruner.current_masks().items():
            for t in (mask.to(torch.uint8), params[name].detach()):
                gathered = pl_module.all_gather(t)  # (world, *shape)
                same &= all(torch.equal(gathered[0], gathered[r]) for r in range(gathered.shape[0]))
        self.checks.append(bool(same))


class RankBatches:
    """This rank's batches (DistributedSampler order), resumable mid-epoch through ``state_dict``."""

    def __init__(self, items: list) -> None:
        self.items, self.start, self.pos = items, 0, 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        start, self.start = self.start, 0
        for i in range(start, len(self.items)):
            self.pos = i + 1
            yield self.items[i]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["pos"] % len(self.items)


class StepNet(OrderedTinyNet):
    def train_dataloader(self):
        return RankBatches(list(super().train_dataloader()))


def window_resume(a) -> None:
    """Rounds at steps 6 and 12 from windows of 4 batches; checkpoints at every step; resumed from steps 3-5."""

    def run(ckpt_path=None) -> dict:
        pl.seed_everything(0, verbose=False)
        model = StepNet(batch_size=a.batch, lr=a.lr, n=256)  # 8 batches an epoch on each of 2 ranks
        pruner = OBDPruning(0.8, start_step=6, every_n_steps=6, end_step=12, num_batches=4, verbose=0)
        seen, prune = [], pruner.criterion.prune

        def spying(ctx):
            seen.append(([b[0].cpu() for b in ctx.batches], [t.cpu().clone() for t in ctx.stats.tensors()]))
            return prune(ctx)

        pruner.criterion.prune = spying
        callbacks: list = [pruner]
        if ckpt_path is None:
            ckpt = ModelCheckpoint(os.path.join(a.out, "ckpt"), "{step}", every_n_train_steps=1, save_top_k=-1)
            callbacks.append(ckpt)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=a.devices,
            strategy=a.strategy,
            max_steps=13,
            max_epochs=-1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=ckpt_path is None,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=callbacks,
            use_distributed_sampler=False,
        )
        trainer.fit(model, ckpt_path=ckpt_path)
        params = dict(model.named_parameters())
        return {
            "masks": {n: m.cpu() for n, m in pruner.current_masks().items()},
            "weights": {n: p.detach().cpu() for n, p in params.items()},
            "seen": seen,
            "steps": [r["global_step"] for r in pruner.history],
            "rank": trainer.global_rank,
        }

    runs = {"ref": run()}
    for step in (3, 4, 5):
        runs[step] = run(os.path.join(a.out, "ckpt", f"step={step}.ckpt"))
    torch.save(runs, os.path.join(a.out, f"rank{runs['ref']['rank']}.pt"))


def exit_cleanly() -> None:
    """Wait until every rank has written its file, then leave without interpreter finalization.

    At finalization the gloo groups (held by the strategy and, under FSDP, the device mesh) are
    destroyed while their worker threads wait for the GIL; now and then one is unwound through a
    ``noexcept`` frame and the process aborts ("terminate called without an active exception", exit
    -6) after the job succeeded. A barrier also keeps the parent rank from exiting before the other
    rank's file exists.
    """
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--method", default="obs")
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--num-batches", type=int, default=4)
    p.add_argument("--chaos", action="store_true")
    p.add_argument("--resume", default=None)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--window-resume", action="store_true")
    p.add_argument("--distill", action="store_true", help="a Distillation callback beside the pruner")
    a = p.parse_args()
    if a.window_resume:
        return window_resume(a)
    pl.seed_everything(0, verbose=False)
    model = OrderedTinyNet(batch_size=a.batch, lr=a.lr, n=256)
    pruner = METHODS[a.method](a)
    check = GatherCheck(pruner)
    chaos = Chaos(pruner) if a.chaos else None
    callbacks = ([chaos] if chaos else []) + [pruner, check]
    distill = Distillation(kd_weight=1.0, temperature=2.0) if a.distill else None
    if distill is not None:
        callbacks.append(distill)
    callbacks.append(ModelCheckpoint(dirpath=os.path.join(a.out, "ckpt"), filename="{epoch}", save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=a.devices,
        strategy=a.strategy if a.devices > 1 else "auto",
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
    params = dict(model.named_parameters())
    torch.save(
        {
            "masks": {n: m.cpu() for n, m in pruner.current_masks().items()},
            "weights": {n: params[n].detach().cpu() for n in pruner.current_masks()},
            "diagonals": pruner.diagonals,
            "checks": check.checks,
            "diverged_before_round": chaos.diverged if chaos else [],
            "history": [dict(r) for r in pruner.history],
            "world": trainer.world_size,
            "all_weights": {n: p.detach().cpu() for n, p in params.items()},
            "teacher": {k: v.cpu() for k, v in distill.teacher.state_dict().items()} if distill else None,
            "terms": {k: float(v) for k, v in distill.last_terms.items()} if distill else None,
        },
        os.path.join(a.out, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
    exit_cleanly()

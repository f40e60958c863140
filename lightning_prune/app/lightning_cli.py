"""``lightning-prune-cli``: LightningCLI with the pruning callbacks, for users of LightningCLI rather than Hydra.

    lightning-prune-cli fit --model lightning_prune.app.models.MLPClassifier --model.input_shape=[1,8,8] \\
        --model.num_classes=10 --data lightning_prune.app.data.DigitsDataModule \\
        --trainer.callbacks+=lightning_prune.OBSPruning --trainer.callbacks.target=0.8

Any LightningModule and LightningDataModule can be named by class path (``subclass_mode``); every
constructor argument of the callbacks is type-annotated, so LightningCLI parses and validates them
(``--trainer.callbacks.hessian=kfac``, ``--trainer.callbacks.every_n_steps=100``, ...). ``--print_config``
writes the whole configuration as YAML, ``--config FILE`` reads it back.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI


def main(model_class: type[pl.LightningModule] | None = None, datamodule_class: type | None = None) -> None:
    """Run LightningCLI; with no classes given, model and data are chosen on the command line."""
    LightningCLI(
        model_class or pl.LightningModule,
        datamodule_class or pl.LightningDataModule,
        subclass_mode_model=model_class is None,
        subclass_mode_data=datamodule_class is None,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()

"""The package's LightningCLI (``lightning-prune-cli``) with the model and data fixed in code:

    python examples/lightning_cli.py fit --trainer.max_epochs=8 \
        --trainer.callbacks+=lightning_prune.OBSPruning --trainer.callbacks.target=0.8

Every constructor argument of the callbacks is type-annotated, so LightningCLI can parse and
validate them (`--trainer.callbacks.hessian=kfac`, `--trainer.callbacks.scope=layer`, ...).
"""

from lightning_prune.app.data import DigitsDataModule
from lightning_prune.app.lightning_cli import main as cli
from lightning_prune.app.models import MLPClassifier


class DigitsMLP(MLPClassifier):
    """MLPClassifier with the digits shapes filled in, so the CLI needs no model arguments."""

    def __init__(self, hidden: list[int] = [128, 64], lr: float = 3e-3) -> None:  # noqa: B006
        super().__init__(input_shape=(1, 8, 8), num_classes=10, hidden=hidden, lr=lr)


def main() -> None:
    cli(DigitsMLP, DigitsDataModule)


if __name__ == "__main__":
    main()

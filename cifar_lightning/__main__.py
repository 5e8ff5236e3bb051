"""``python -m cifar_lightning fit|validate|test|predict ...``: the LightningCLI entry point."""

from cifar_lightning.cli import cli_main

if __name__ == "__main__":
    cli_main()

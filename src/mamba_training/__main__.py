"""`python -m mamba_training` (and `torchrun -m mamba_training`) runs the CLI."""

from mamba_training.cli.main import main

if __name__ == "__main__":
    main()

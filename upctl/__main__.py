"""`python -m upctl ...` (and `torchrun ... -m upctl pretrain ...`)."""

from upctl.main import app

app()

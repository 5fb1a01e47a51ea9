"""Entry module for nnU-Net's trainer search (imported as a top-level module from this folder)."""
from upernet_vit.integrations.nnunet.trainer import *  # noqa: F401,F403

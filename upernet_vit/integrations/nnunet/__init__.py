"""nnU-Net v2 trainers for UperNetViT (``pip install -e ".[nnunet]"``).

nnU-Net finds them through ``nnUNet_extTrainer``; ``upernet-vit nnunet-path`` prints the folder to export.
"""
import os

EXT_TRAINER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ext_trainers")
CONFIG_ENV = "UPERNET_VIT_CONFIG"  # YAML for the generic trainer at training time
CHECKPOINT_ENV = "UPERNET_VIT_CHECKPOINT"  # pretrained backbone file for the recipe trainers

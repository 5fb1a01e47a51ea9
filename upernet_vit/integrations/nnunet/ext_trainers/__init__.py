"""The folder that ``nnUNet_extTrainer`` points at: nnU-Net imports each module here by its bare name."""

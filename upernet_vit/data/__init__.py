"""Reading the user's data: image and label files as a viewer shows them, datasets (nnU-Net raw, folders,
demo), folds, the intensity rule, normalization and augmentation. Imports nothing from inference/,
runs/ or training/."""

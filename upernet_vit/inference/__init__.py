"""Using a trained model: sliding-window inference with test-time augmentation, predict (a folder in,
masks out), evaluate and its metrics. Builds on data/ and runs/; imports nothing from training/."""

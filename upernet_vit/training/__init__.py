"""Training and inference on top of the model library (the model core never imports this package)."""

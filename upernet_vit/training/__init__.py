"""The training loop (trainer), the process group, losses, optimizer, memory estimate and loggers; builds
on data/, inference/ and runs/ (the model core never imports this package)."""

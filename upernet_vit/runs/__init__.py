"""What the commands write: the run folder (lock, crash repair, checkpoints final/best/latest, metrics
rows and plots), the model's record, and the rule that no command writes over a file it did not create.
Serves training/, inference/ and export/; imports none of them, nor data/."""

"""Data: the DAPO prompt template, the embedded synthetic task, TFDS builders and a resumable iterator."""

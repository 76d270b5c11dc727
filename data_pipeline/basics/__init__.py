"""What the whole project uses, the model included: errors a user can cause (errors.py), the
token ids (vocab.py), and the host helpers (system.py: atomic files, a free port, the machine's
description). Nothing here imports the rest of the data package, webdataset or zstandard."""

"""What every job shares: the entry helper (`entry.py`) and the git commit (`git.py`)."""

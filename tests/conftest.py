"""Shared test set-up: the project root on sys.path, a headless plotting backend, two CPU threads."""
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

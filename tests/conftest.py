"""Test-session settings: one torch thread, and a stable Warp kernel cache in the checkout."""

import os
from pathlib import Path

import torch

os.environ.setdefault("WARP_CACHE_PATH", str(Path(__file__).resolve().parents[1] / ".warp_cache"))
torch.set_num_threads(1)

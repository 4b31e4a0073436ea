"""Test-session settings: one torch thread.

Warp's kernel cache is WARP_CACHE_PATH as scripts/test.sh sets it, else Warp's user cache.
"""

import torch

torch.set_num_threads(1)

"""Torch devices: :func:`check_device` validates a device name with a one-line error.

Warp's own set-up (initialisation, the compile notice) is :mod:`diffsim.kernels.runtime`.
"""

from __future__ import annotations


def check_device(device) -> object:
    """The ``torch.device`` for ``device``, or a ValueError that names the valid choices.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.

    Raises:
        ValueError: not a device name (``"gpu"``), or CUDA on a torch build or machine
            without it; the message says what to use instead.
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f'device {device!r} is not a device; use "cpu" or "cuda" (or "cuda:N")'
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f'device {str(device)!r} is not supported; use "cpu" or "cuda"')
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(
                f"device {str(device)!r}: this torch ({torch.__version__}) is a CPU-only build; "
                'use device="cpu", or install a CUDA build of torch'
            )
        if not torch.cuda.is_available():
            raise ValueError(
                f'device {str(device)!r}: no CUDA GPU is available here; use device="cpu" '
                "(diffsim info lists the devices)"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"device {str(device)!r}: there are {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    return dev

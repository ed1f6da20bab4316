"""Memory sizes as people write them (``24GiB``, ``16GB``, ``8000MiB``), as we print them, and
what a device has free."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """``"24GiB"``, ``"24GB"``, ``"1.5 TiB"``, ``"8g"`` or a number of bytes -> bytes."""
    if isinstance(text, int | float):
        value, unit = float(text), ""
    else:
        match = _SIZE.match(str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"memory size {text!r}: write a number with a unit, e.g. 24GiB, 16GB or 8000MiB")
        value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return int(value * _UNITS[unit])


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def available_memory(device: str) -> int | None:
    """What ``device`` has free now (CUDA: the driver's free bytes; CPU: MemAvailable); ``None``: unknown."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_budget(device: str, margin: float = 0.9) -> int | None:
    """The budget when none is given: the device's free memory, less a margin for everything else."""
    free = available_memory(device)
    return None if free is None else int(free * margin)

"""Memory sizes as users write them ('80GB', '1.9TB', '512MiB'), and as reports print them."""
from __future__ import annotations

import re

from ..errors import ConfigError

GiB = 1024 ** 3
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)\s*([KMGT]?)(i?B)?\s*", re.IGNORECASE)


def parse_size(text, what: str = "size") -> int:
    """'80GB', '80GiB', '80G', '1.9TB', '24000MB', '8.5e10' (or an int) -> bytes. Units are
    binary (GB = GiB = 2**30, TB = TiB), as GPU specs quote 80 GB cards and ``free -h`` quotes
    a node's RAM. ConfigError naming ``what`` when it is not a size."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"{what} must be >= 0 bytes, got {text}")
        return text
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise ConfigError(f"{what} is not a size: {text!r} (e.g. 80GB, 1.9TB, 512GiB, 24000MB)")
    mult = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def format_size(n: int) -> str:
    """Bytes as GiB (or MiB / KiB below a tenth of the next unit), fixed width."""
    if abs(n) >= GiB / 10:
        return f"{n / GiB:9.2f} GiB"
    if abs(n) >= 1024 ** 2 / 10:
        return f"{n / 1024 ** 2:9.1f} MiB"
    return f"{n / 1024:9.1f} KiB"

"""Give large freed buffers back to the operating system at once.

glibc serves a large malloc with mmap, but after the first such block is freed it raises its mmap threshold
(up to 32 MB) and later blocks come from per-thread heaps, which keep them after they are freed. A decoded
36-megapixel image is ~144 MB in Pillow's 16 MB blocks, so every request thread that once decoded one kept
that memory: six uploads decoded one at a time still left the api at 800 MB. A fixed threshold turns that
adjustment off, so a bitmap's memory is returned when the image is.
"""

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1024 * 1024


def return_large_blocks_to_the_os() -> bool:
    """Fix glibc's mmap threshold at 1 MiB; False (and nothing changed) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not ok:
        log.warning("mallopt(M_MMAP_THRESHOLD) refused; large buffers may stay with the process once freed")
    return ok

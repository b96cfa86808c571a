"""Handing freed memory back to the system between the pieces of a long call.

glibc keeps freed blocks of a few MB in its heap (its mmap threshold rises to the size of the
first such block freed) and often places the next blocks of the same size beside them rather
than in them (the alignment torch asks for makes a freed block a little too small for the next
request), so a call that allocates and frees many large temporaries grows the process's
resident memory by every temporary it ever held, not by those it holds at once: measured 81 MB
resident for 33 MB of live rows of 2M points, and ssm_conv's per-group temporaries adding up
to 3.5x its input. malloc_trim(0) returns the freed pages (about 10 us); they fault in again
when reused, which costs a few percent where the pieces are large (rows of a million points,
channel groups of ssm_conv) and up to 2x where they are not, so callers release only there.
Other C libraries: a no-op.
"""
__all__ = ["release"]


def _malloc_trim():
    try:
        import ctypes

        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    return fn


_TRIM = _malloc_trim()


def release(when=True):
    """Return the freed pages of the heap to the system (glibc's malloc_trim(0)) if `when`."""
    if when and _TRIM is not None:
        _TRIM(0)

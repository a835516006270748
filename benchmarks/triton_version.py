"""Triton's version, or None when it is not installed (the CPU suite does not need it)."""


def get():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__

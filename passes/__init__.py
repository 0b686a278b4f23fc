"""graphprune passes, installed as graphprune.passes."""
if __name__ == "passes":  # imported as a top-level package (e.g. from a checkout): rules would register twice
    raise ImportError("import this package as graphprune.passes (run `pip install -e .`)")

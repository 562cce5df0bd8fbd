"""``normlab compare``: a controlled comparison of normalization strategies and its report."""

from normlab.compare.compare import compare, parse_variants

__all__ = ["compare", "parse_variants"]

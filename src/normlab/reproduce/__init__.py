"""``normlab reproduce``: the papers' claims (METHODS.md §6) as experiments with honest verdicts."""

from normlab.reproduce.claims import CLAIMS
from normlab.reproduce.reproduce import BUDGETS, reproduce, select_claims

__all__ = ["BUDGETS", "CLAIMS", "reproduce", "select_claims"]

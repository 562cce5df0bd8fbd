"""``normlab reproduce``: the papers' claims (numbered as in docs/reproduce.md) as experiments with honest verdicts."""

from normlab.reproduce.claims import CLAIMS
from normlab.reproduce.reproduce import BUDGETS, reproduce, select_claims

__all__ = ["BUDGETS", "CLAIMS", "reproduce", "select_claims"]

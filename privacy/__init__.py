"""Differential privacy for lungvl: accounting with persistent state and per-site budgets.

Layering (DESIGN.md section 1): imports ``lungvl_model``, numpy, torch and opacus only; never flwr.
"""

from privacy.accountant import (
    ACCOUNTANT_STATE_FILE,
    HistoryEntry,
    PrivacyAccountant,
    PrivacyBudgetExceeded,
    available_accountants,
    create_accountant,
    get_noise_multiplier,
    register_accountant,
)
from privacy.budget import ClientLevelAccountant, SiteBudget

__all__ = [
    "ACCOUNTANT_STATE_FILE",
    "ClientLevelAccountant",
    "HistoryEntry",
    "PrivacyAccountant",
    "PrivacyBudgetExceeded",
    "SiteBudget",
    "available_accountants",
    "create_accountant",
    "get_noise_multiplier",
    "register_accountant",
]

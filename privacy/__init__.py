"""Differential privacy for lungvl: accounting with persistent state, per-site budgets, DP-SGD wiring.

Modules: :mod:`privacy.accountant` (registry, persistent state), :mod:`privacy.budget` (the server's
client-level accountant, a site's budget), :mod:`privacy.site_policy` (what a site agrees to, whatever
the server asks), :mod:`privacy.dp_sgd` and :mod:`privacy.dp_sgd_train`
(patient-level DP-SGD of the LungVL model with Opacus). Import from those modules; this package
re-exports nothing. Layering (DESIGN.md section 1): imports ``lungvl_model``, numpy, torch and opacus
only; never flwr.
"""

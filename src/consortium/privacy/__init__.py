"""Differential privacy: central DP-FedAvg stages, accountants and the privacy ledger."""

from consortium.privacy.accountant import ACCOUNTANTS, RoundMechanism, calibrate_noise, epsilon
from consortium.privacy.central import CentralDP, central_dp, update_noise_multiplier

__all__ = [
    "ACCOUNTANTS",
    "CentralDP",
    "RoundMechanism",
    "calibrate_noise",
    "central_dp",
    "epsilon",
    "update_noise_multiplier",
]

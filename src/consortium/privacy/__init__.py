"""Differential privacy: central and distributed DP stages, accountants and the privacy ledger."""

from consortium.privacy.accountant import ACCOUNTANTS, RoundMechanism, calibrate_noise, epsilon
from consortium.privacy.central import CentralDP, central_dp, update_noise_multiplier
from consortium.privacy.distributed import DistributedDP, distributed_dp

__all__ = [
    "ACCOUNTANTS",
    "CentralDP",
    "DistributedDP",
    "RoundMechanism",
    "calibrate_noise",
    "central_dp",
    "distributed_dp",
    "epsilon",
    "update_noise_multiplier",
]

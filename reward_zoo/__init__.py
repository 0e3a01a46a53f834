"""The reward-model zoo: multi-dimensional, identity, physics, temporal, text and aesthetic rewards for videos.

Filled by the reward-zoo issue; see ``../shared/DESIGN.md`` section 4.4 for the contract.
"""

"""Prefetch and eviction policies, one per file, behind the interface of `base.py`.

A new policy is one new file and one line in `registry.py`.
"""

from finemoe.policies.base import ExpertKey, LayerRouting, Policy, PolicyContext, Prefetch, StepInfo

__all__ = ["ExpertKey", "LayerRouting", "Policy", "PolicyContext", "Prefetch", "StepInfo"]

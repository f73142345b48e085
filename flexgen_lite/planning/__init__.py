"""Choosing a policy before anything is allocated: the layout of a policy over the tiers, its memory plan and
budgets, the cost model, the policy search and the compute dtype."""

"""Memory: activation rematerialization, saved-activation measurement and the per-rank memory planner."""

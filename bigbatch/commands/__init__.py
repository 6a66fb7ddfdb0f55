"""Commands of the CLI that are not training itself: plan, lr-find, report."""

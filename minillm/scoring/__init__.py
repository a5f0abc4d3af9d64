"""Scoring: input statistics, forward-only (SPSA) and exact gradient estimates, the importance
criteria built on them, and allocation of kept units from their scores."""

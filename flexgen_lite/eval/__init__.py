"""Evaluations through the offloaded engine: an lm-eval model (lm_eval_model.py, needs the `eval` extra) and
the quality report of a policy (cli/quality.py)."""

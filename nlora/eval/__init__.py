"""Evaluation: predictions on the tasks, the continual metrics (AP, BWT, FWT, forgetting), general ability through lm-evaluation-harness, rescoring."""

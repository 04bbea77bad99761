"""Experiment configs (`experiments/configs`), the paper's tables as suites (`experiments/suites`), budgets
(`experiments/budgets`), and `python -m experiments` to run, report and plan them."""

"""Accuracy acceptance through the served API: lm-eval against a running server, each task beside the number
DeepSeek-V2-Lite's model card publishes (`python -m server eval`, docs/eval.md).

card.py     the card's table (server/data/model_card_eval.json) and which lm-eval task measures each row
harness.py  lm-eval against the server: the route per task, the API model, one evaluate() per task
verdict.py  the acceptance rule: no more than K standard errors below the card
report.py   table, JSON, PNG chart; two runs side by side
cli.py      the `eval` subcommand
"""

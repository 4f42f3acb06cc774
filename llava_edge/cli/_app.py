"""The command tree and how the CLI speaks: ``say`` writes to stderr, answers go to stdout."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    help="Train, export, quantize and run LLaVA-style vision-language models on the edge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
toy_app = typer.Typer(help="The toy world: synthetic data and small real LLaVA checkpoints.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
train_app = typer.Typer(help="LLaVA's two training stages, and LoRA merging.", no_args_is_help=True)
app.add_typer(train_app, name="train")
data_app = typer.Typer(help="Training data: instruction data written by a text-only LLM, caption data for stage 1.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
eval_app = typer.Typer(help="Evaluation with a text-only LLM as the judge.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)

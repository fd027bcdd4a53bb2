"""A one-step KFP pipeline with one parameter of each type, compiled to a package for the
`cellpuzzles pipeline` tests. (No `from __future__ import annotations`: kfp reads the
parameter types from the real annotations.)"""

from pathlib import Path

from kfp import compiler, dsl


@dsl.component(base_image="python:3.11-slim")
def train_step(data_uri: str, max_steps: int, lr: float, tag: str, dry_run: bool) -> str:
    return f"{data_uri} {max_steps} {lr} {tag} {dry_run}"


@dsl.pipeline(name="tiny-retrain")
def tiny_pipeline(data_uri: str, max_steps: int = 10, lr: float = 0.001, tag: str = "weekly", dry_run: bool = False):
    train_step(data_uri=data_uri, max_steps=max_steps, lr=lr, tag=tag, dry_run=dry_run)


def compile_tiny(path: Path) -> Path:
    compiler.Compiler().compile(tiny_pipeline, str(path))
    return path

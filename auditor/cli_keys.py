"""``auditor keys``: the owner's signing keys (being written)."""

import typer

keys_app = typer.Typer(help="Make and manage owners' signing keys.", no_args_is_help=True)

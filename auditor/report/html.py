"""The Jinja2 environment the evidence report is rendered with."""

from __future__ import annotations

import jinja2

from auditor.plugin_manager import get_plugin_manager

__all__ = ["jinja_environment"]


def jinja_environment() -> jinja2.Environment:
    """A fresh environment: report templates loaded, auto-escaping on, strict
    undefined variables, then every plugin's ``prepare_jinja2_environment``."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("auditor.report", "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    get_plugin_manager().hook.prepare_jinja2_environment(env=env)
    return env

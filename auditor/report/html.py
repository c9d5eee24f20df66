"""The evidence report as HTML: the Jinja2 environment and the rendering of a report document."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jinja2

from auditor.plugin_manager import get_plugin_manager

__all__ = ["jinja_environment", "render_html"]


def jinja_environment() -> jinja2.Environment:
    """A fresh environment: report templates loaded, auto-escaping on, strict
    undefined variables, then every plugin's ``prepare_jinja2_environment``."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("auditor.report", "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        extensions=["jinja2.ext.do"],
    )
    get_plugin_manager().hook.prepare_jinja2_environment(env=env)
    return env


def render_html(document: Mapping[str, Any], *, template: str, seal: Mapping[str, Any]) -> str:
    """``document`` rendered with ``template`` (``report.html.j2`` or ``summary.html.j2``); ``seal`` holds
    the hashes and signer the page shows. Each result is shown as its component declares (:mod:`.view`)."""
    from auditor.report import text
    from auditor.report.view import CORE_BUNDLE_KEYS, ComponentView, view_for_scheme, view_of

    env = jinja_environment()
    env.filters.update(fmt=text.fmt, label=text.label)
    env.globals.update(
        text=text, verdict_words=text.VERDICT_WORDS, view_of=view_of, view_for_scheme=view_for_scheme,
        core=ComponentView("core", "", None), core_bundle_keys=CORE_BUNDLE_KEYS,
    )  # fmt: skip
    return env.get_template(template).render(r=document, seal=seal)

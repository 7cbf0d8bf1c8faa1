"""The web UI's HTML: Jinja2 templates from ``templates/``, autoescaped, strict about
missing names (a typo in a template is an error in the tests, not an empty cell)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from tron.services.daemon.ui.actions import buttons
from tron.services.daemon.ui.views import PARKED_WHY, local_time

TEMPLATES = Path(__file__).parent / "templates"
# No inline script may run (so injected markup cannot either); htmx and uPlot set inline styles.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def _usd(value: float | None) -> str:
    """Dollars to a hundredth of a cent: a simulated or small call costs fractions of one."""
    return "-" if value is None else f"${value:,.4f}"


def _tokens(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _share(value: float | None) -> str:
    if value is None:
        return ""
    return "<1%" if 0 < value < 0.01 else f"{value * 100:.0f}%"


class Templates:
    def __init__(self) -> None:
        self.env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                               trim_blocks=True, lstrip_blocks=True)
        self.env.filters["clock"] = local_time
        self.env.filters["age"] = _age
        self.env.filters["usd"] = _usd
        self.env.filters["tokens"] = _tokens
        self.env.filters["share"] = _share
        self.env.globals["PARKED_WHY"] = PARKED_WHY
        self.env.globals["buttons"] = buttons

    def render(self, template: str, /, **context) -> str:
        return self.env.get_template(template).render(**context)

    def response(self, template: str, /, *, status: int = 200, **context) -> web.Response:
        return self.html(self.render(template, **context), status=status)

    @staticmethod
    def html(text: str, *, status: int = 200) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/html", charset="utf-8",
                            headers=SECURITY_HEADERS)

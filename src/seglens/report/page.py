"""Building blocks of ``report.html`` shared by the page and the analyses' report blocks.

Every helper returns escaped HTML; ``Page`` embeds a run's figures as data URIs and remembers
which ones a block has shown, so the page can list the rest under "Other figures".
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Page", "escape", "interval", "not_run", "num", "pairs_table", "paragraph", "table"]


def escape(value: Any) -> str:
    """HTML-escaped ``str(value)``."""
    return html.escape(str(value), quote=True)


def num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def interval(value: float | None, ci: Sequence[float | None] | None) -> str:
    if value is None:
        return "n/a"
    if not ci or ci[0] is None or ci[1] is None:
        return num(value)
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def not_run(key: str) -> str:
    return f'<p class="muted">Not run: results.json has no <code>{escape(key)}</code> section.</p>'


def switched_off(results: Mapping[str, Any], key: str, command: str) -> str:
    """A note for a run whose config switched the analysis of config section ``key`` off, with
    the subcommand that adds it (``''`` when it was on)."""
    if ((results.get("config") or {}).get(key) or {}).get("enabled", True):
        return ""
    return paragraph(
        f"Off in this run ({key}.enabled: false); `seglens {command} --run RUN` adds it to this "
        "run."
    )


def table(header: Iterable[str], rows: Iterable[Sequence[str]], classes: Sequence[str] = ()) -> str:
    """An HTML table; cells are already escaped. ``classes`` gives a CSS class per row."""
    head = "".join(f"<th>{h}</th>" for h in header)
    lines = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        cells = "".join(
            f'<td class="num">{c}</td>' if j else f"<td>{c}</td>" for j, c in enumerate(row)
        )
        lines.append(f"<tr{cls}>{cells}</tr>")
    return f"<table>\n<tr>{head}</tr>\n" + "\n".join(lines) + "\n</table>"


def pairs_table(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


class Page:
    """Embeds the run's figures, remembering which ones a section has shown."""

    def __init__(self, results: dict[str, Any], run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.figures = dict(results.get("figures") or {})
        self.shown: set[str] = set()

    def figure(self, name: str, reading: str | None = None) -> str:
        """``<figure>`` with the PNG as a data URI and the reading as caption ('' if absent)."""
        relative = self.figures.get(name)
        path = self.run_dir / relative if relative else None
        if path is None or not path.is_file():
            return ""
        self.shown.add(name)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        caption = f"<figcaption>{escape(reading)}</figcaption>" if reading else ""
        return (
            f'<figure id="fig-{escape(name)}"><img alt="{escape(name)}" '
            f'src="data:image/png;base64,{data}">{caption}</figure>'
        )

    def leftover(self) -> str:
        names = [n for n in self.figures if n not in self.shown]
        return "\n".join(self.figure(n) for n in names)


def paragraph(text: str | None) -> str:
    """``<p>text</p>`` (escaped), or '' for no text."""
    return f"<p>{escape(text)}</p>" if text else ""

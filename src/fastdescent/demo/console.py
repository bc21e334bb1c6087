"""Printing for the demo: a progress line per task and fixed-width tables."""

import sys


class Progress:
    """A progress bar redrawn in place on a terminal; one line per finished task otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, label, done, total, note=""):
        if self.live:
            filled = round(20 * done / total) if total else 20
            self.stream.write(f"\r  {label:<22} [{'#' * filled}{'.' * (20 - filled)}] {done}/{total} {note}")
            if done == total:
                self.stream.write("\n")
            self.stream.flush()
        elif done == total:
            print(f"  {label:<22} done: {note}", file=self.stream, flush=True)


def table(rows, headers, aligns):
    """Rows of strings as a fixed-width table; ``aligns`` is a string of '<'/'>'."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(f"{h:{a}{w}}" for h, a, w in zip(headers, aligns, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, aligns, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in out)

"""Replace one marked section of a Markdown report and keep the rest: results measured on other machines, and the
hand-written reading around them."""


def write_section(path, name, text, title):
    """Put `text` between `<!-- name:begin -->` and `<!-- name:end -->` in `path` (appended, under a new file's
    `title`, when the markers are not there yet)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text(encoding="utf-8") if path.exists() else f"# {title}\n"
    if begin in old:
        new = old[: old.index(begin)] + begin + "\n" + text + "\n" + old[old.index(end) :]
    else:
        new = old.rstrip("\n") + f"\n\n{begin}\n{text}\n{end}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")

"""Replace one marked section of a Markdown report and keep the rest: results measured on other machines, and the
hand-written reading around them; and the one line that names the machine a section was measured on."""

import os
import platform


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


def machine():
    """Architecture, cores, CPU model, GPU and torch version: the heading of a section of results."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), {gpu}; torch {torch.__version__}"

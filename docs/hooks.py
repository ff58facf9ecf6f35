"""MkDocs hooks (mkdocs.yml `hooks:`).

- The README is the site's home page; its links into docs/ become links between pages.
- The files a saved model ships for `trust_remote_code`, and the package modules it does not ship, are generated from
  `exported_code_files()` wherever a page holds one of the markers below, so no page keeps that list by hand.
- `<!-- include: PATH -->` inserts a Markdown file of the repository (a kernel folder's README), its headings one level
  down, so the kernels' notes have one copy, beside their code.
"""

import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
EXPORTED = "<!-- exported-code-files -->"
PACKAGE_ONLY = "<!-- package-only-files -->"
INCLUDE = re.compile(r"^<!-- include: (\S+) -->$", re.M)


def code_files() -> tuple[list[str], list[str]]:
    """(exported, package-only) module file names of this checkout's `modeling_engram`."""
    sys.path.insert(0, str(ROOT))  # this checkout, whatever `modeling_engram` the environment has installed
    try:
        from modeling_engram.hub import exported_code_files
    finally:
        sys.path.remove(str(ROOT))
    exported = exported_code_files(ROOT / "modeling_engram" / "modeling_engram.py")
    modules = sorted(path.name for path in (ROOT / "modeling_engram").glob("*.py") if path.name != "__init__.py")
    return exported, [name for name in modules if name not in exported]


def code_spans(names: list[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


def included(match: re.Match) -> str:
    text = (ROOT / match.group(1)).read_text(encoding="utf-8")
    parts = text.split("```")  # odd parts are code blocks, whose "# " lines are comments
    return "```".join(part if index % 2 else re.sub(r"^(#+) ", r"#\1 ", part, flags=re.M)
                      for index, part in enumerate(parts))


def on_files(files, config):
    files.append(File.generated(config, "index.md", content=(ROOT / "README.md").read_text(encoding="utf-8")))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "index.md":
        markdown = markdown.replace("](docs/", "](")
    if EXPORTED in markdown or PACKAGE_ONLY in markdown:
        exported, package_only = code_files()
        markdown = markdown.replace(EXPORTED, code_spans(exported)).replace(PACKAGE_ONLY, code_spans(package_only))
    return INCLUDE.sub(included, markdown)

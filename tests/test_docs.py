"""The documentation site builds with warnings as errors, so a broken link, anchor or API reference fails; the README
is its home page and its quickstart runs; the lists the site generates match the code."""

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, require

import modeling_engram
from modeling_engram import exported_code_files

require("mkdocs")
require("mkdocstrings")

ROOT = Path(ROOT)


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(root / "mkdocs.yml"), "--site-dir", str(site)], capture_output=True, text=True,
                          timeout=240)


def page_text(site: Path, page: str) -> str:
    return html.unescape((site / page / "index.html").read_text(encoding="utf-8"))


def python_block(markdown: str, heading: str) -> str:
    section = markdown[markdown.index(heading) :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


def test_the_site_builds_strict_with_the_readme_as_home_and_generated_file_lists(tmp_path):
    site = tmp_path / "site"
    run = build(ROOT, site)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "## Two commands" in (ROOT / "README.md").read_text() and 'id="two-commands"' in page_text(site, ".")
    hub = page_text(site, "hub")
    exported = exported_code_files()
    runs = hub.split('id="what-trust_remote_codetrue-runs"')[1]
    assert ", ".join(f"<code>{name}</code>" for name in exported) in runs, "the exported list, in its order"
    package_only = [path.name for path in (ROOT / "modeling_engram").glob("*.py") if path.name not in
                    {"__init__.py", *exported}]
    assert package_only and all(f"<code>{name}</code>" in hub for name in package_only)
    api = page_text(site, "api")
    assert all(f'id="modeling_engram.' in api and re.search(rf'id="modeling_engram\.(\w+\.)?{name}"', api)
               for name in modeling_engram.__all__)


def test_the_api_reference_names_every_public_name():
    documented = re.findall(r"^::: modeling_engram\.(?:\w+\.)?(\w+)$", (ROOT / "docs" / "api.md").read_text(), re.M)
    assert sorted(set(modeling_engram.__all__) - set(documented)) == []


@pytest.mark.slow
def test_a_broken_link_anchor_or_api_reference_fails_the_build(tmp_path):
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("mkdocs.yml", "README.md"):
        shutil.copy(ROOT / name, copy / name)
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copytree(ROOT / "modeling_engram", copy / "modeling_engram", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", copy / "kernels", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    assert build(copy, tmp_path / "intact").returncode == 0, "the copy builds before it is broken"
    with open(copy / "README.md", "a") as readme:
        readme.write("\nSee [the model](docs/model.md#no-such-section).\n")
    with open(copy / "docs" / "serving.md", "a") as page:
        page.write("\nSee [nowhere](nowhere.md).\n")
    run = build(copy, tmp_path / "broken")
    assert run.returncode != 0
    assert "#no-such-section" in run.stderr and "nowhere.md" in run.stderr
    (copy / "docs" / "serving.md").write_text((ROOT / "docs" / "serving.md").read_text())
    (copy / "README.md").write_text((ROOT / "README.md").read_text())
    with open(copy / "docs" / "api.md", "a") as page:
        page.write("\n::: modeling_engram.no_such_function\n")
    run = build(copy, tmp_path / "broken-api")
    assert run.returncode != 0 and "modeling_engram.no_such_function" in run.stdout + run.stderr


def test_readme_quickstart_runs(tiny_tokenizer):
    code = python_block((ROOT / "README.md").read_text(encoding="utf-8"), "## Quickstart")
    tiny = {"hidden_size=512": "hidden_size=32", "intermediate_size=1536": "intermediate_size=64",
            "num_hidden_layers=12": "num_hidden_layers=2", "engram_layer_ids=[1, 6]": "engram_layer_ids=[0, 1]",
            "engram_vocab_size=[200_000, 200_000]": "engram_vocab_size=[101, 103]"}
    for size, small in tiny.items():
        assert size in code, size
        code = code.replace(size, small)
    # A random model may pick its end-of-sequence token within 20 steps (it did on torch 2.14.1): always 20 tokens.
    code = code.replace("max_new_tokens=20)", "max_new_tokens=20, min_new_tokens=20)")
    scope = {"tokenizer": tiny_tokenizer}
    torch.manual_seed(0)
    exec(code.replace("model.generate(", "generated = model.generate("), scope)
    assert scope["generated"].shape[1] == len(tiny_tokenizer("def main():").input_ids) + 20
    assert scope["model"].config.engram_compressed_vocab_size == scope["compressed_vocab_size"]

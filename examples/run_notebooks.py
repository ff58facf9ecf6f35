"""Execute the notebooks in examples/ and store them with their outputs, so GitHub and the Hub show the plots.

    python examples/run_notebooks.py                 # every notebook (about 3 minutes on 2 CPU cores)
    python examples/run_notebooks.py quickstart      # some, by name

Each notebook runs top to bottom in a scratch folder (nothing is written next to it), then its outputs are made
stable, so that a rerun changes only what the code changed: no execution timestamps or kernel versions, no stderr
(warnings and progress bars), no absolute paths (the scratch folder, this repository, the Python installation and
the home folder become `.`, `<repo>`, `<python>` and `~`), and no lines of timings (Trainer's `*_runtime` and
`*_per_second` metrics). Plots stay as the PNGs the notebooks display (saved at 110 dpi). `tests/test_notebooks.py`
executes every notebook and checks that the stored ones are executed and stable.
"""

import argparse
import re
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent
TIMING_LINE = re.compile(r"^.*'\w+_(runtime|per_second)'.*\n?", re.MULTILINE)


def stable_text(text: str, scratch: Path) -> str:
    """`text` with machine-specific paths replaced and timing lines dropped."""
    replacements = {str(scratch.resolve()): ".", str(scratch): ".", str(ROOT): "<repo>", sys.prefix: "<python>",
                    sys.base_prefix: "<python>", str(Path.home()): "~"}
    for path, name in sorted(replacements.items(), key=lambda item: -len(item[0])):
        text = text.replace(path, name)
    return TIMING_LINE.sub("", text)


def stabilise(notebook, scratch: Path):
    """Strip what changes from run to run (see the module docstring); returns `notebook`."""
    notebook.metadata.pop("widgets", None)
    notebook.metadata["language_info"] = {"name": "python"}
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in cell.outputs:
            if output.output_type == "stream":
                if output.name == "stderr":
                    continue
                output.text = stable_text(output.text, scratch)
                if not output.text:
                    continue
            elif output.output_type in ("display_data", "execute_result"):
                data = output.data
                for kind in [kind for kind in data if "widget" in kind]:
                    del data[kind]
                if not data:
                    continue
                for kind in ("text/plain", "text/markdown", "text/html"):
                    if kind in data:
                        data[kind] = stable_text(data[kind], scratch)
                output.metadata = {}
            outputs.append(output)
        cell.outputs = outputs
    return notebook


def execute(path: Path, scratch: Path, env: dict | None = None, timeout: int = 300):
    """Run the notebook at `path` in `scratch` with the repository importable; returns the executed notebook."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(scratch)}})
    client.execute(**({} if env is None else {"env": env}))
    return notebook


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="notebook names without .ipynb (default: all)")
    args = parser.parse_args()
    paths = [EXAMPLES / f"{name}.ipynb" for name in args.names] or sorted(EXAMPLES.glob("*.ipynb"))
    for path in paths:
        with tempfile.TemporaryDirectory() as scratch:
            print(f"running {path.name} ...", flush=True)
            notebook = stabilise(execute(path, Path(scratch)), Path(scratch))
        nbformat.write(notebook, path)
        print(f"stored {path.relative_to(ROOT)} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()

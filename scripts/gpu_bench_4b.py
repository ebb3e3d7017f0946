"""DepthVLM-4B's configuration on a CUDA GPU, stage by stage (random bf16 weights: nothing to download).

Run by ``scripts/gpu_check.sh`` (or alone: ``python scripts/gpu_bench_4b.py --out FILE.json``).
Measures, within ``--budget-s`` (the compiled variants are skipped, and say so, once it is spent):

- the depth path through the package's own pipeline (a camera's plan, the torch backend, GPU
  preprocessing) at a 640x480 camera with fx 525 and at the canonical 1344x992 (fx 1000):
  preprocess, vision, LLM, head, postprocess, total; medians of ``--runs``;
- the same forward under ``torch.compile`` and with CUDA graphs (``mode="reduce-overhead"``) at
  640x480: the compile time and the medians;
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
    width, height, fx = CAMERAS["640x480_fx525"]
    for label, mode in (("torch.compile", "default"), ("cuda_graphs", "graphs")):
        if time.monotonic() - began > args.budget_s:
            report["notes"].append(f"{label} skipped: the {args.budget_s:g} s budget was spent")
            continue
        try:
            compiled = vlm.with_backend(TorchBackend(model, compile=mode))
            report["compiled"][label] = time_pipeline(compiled, synthetic_image(width, height),
                                                      Intrinsics.from_fx(width, height, fx), args.runs, warmup=3)
            print(f"{label}: {report['compiled'][label]['median_ms']}", flush=True)
        except Exception as exc:  # a compiler failure is a result to record, not a crash
            report["notes"].append(f"{label} failed: {exc.__class__.__name__}: {str(exc)[:300]}")
        finally:
            torch._dynamo.reset()
            save()
    save()
    print(f"wrote {args.out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

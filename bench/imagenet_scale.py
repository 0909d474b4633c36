"""A Liang-style evaluation at ImageNet size through the service, on the CPU.

    .venv/bin/python bench/imagenet_scale.py [--model resnet50] [--images 200] [--fit 300]
        [--steps 10] [--workers N] [--json PATH]

1. a model of tests/imagenet_zoo.py (224x224, 10 classes, seeded weights: the numbers are
   about time and memory, not accuracy), exported with the TorchScript exporter;
2. a zip of --images + --fit JPEGs of several sizes (smooth random scenes, 240 to 400 pixels
   a side) in 10 class folders, uploaded with resize=256 and center_crop=224;
3. `robustness serve` (the embedded default) in a subprocess evaluates: PGD L-inf at 2/255
   (--steps steps), a universal perturbation (L-inf 8/255, one pass of DeepFool with 3
   candidate classes and 5 iterations), and the PCA (99% of the variance, fit on the --fit
   held-out images) and Gaussian-noise (sigma 0.05) defenses, non-adaptive.

It prints the time of each stage (uploads, the evaluation's own per-stage timing, the wait
from submit to succeeded), the peak resident memory of the gateway, the upload validators and
the worker processes (sampled from /proc every 0.2 s, with each process's own high-water
mark; the upload's conversion is also measured in this process, where it is not missed
between samples), the size of the stored adversarial examples per 1,000 images, and the report's size.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.service import Server  # noqa: E402

MiB = 1 << 20


def scene(rng: np.random.Generator) -> Image.Image:
    """A smooth random RGB scene of a random size: coarse noise upsampled, plus a little grain."""
    width, height = (int(v) for v in rng.integers(240, 401, 2))
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, np.int16) + rng.integers(-8, 9, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg_zip(count: int, path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for n in range(count):
            buffer = io.BytesIO()
            scene(rng).save(buffer, format="JPEG", quality=90)
            archive.writestr(f"class{n % 10}/{n:05d}.jpg", buffer.getvalue())


def export(name: str, path: Path) -> None:
    from tests import imagenet_zoo
    from tests.zoo import export_onnx

    module = imagenet_zoo.make_model(name)
    onnx_model = export_onnx(module, imagenet_zoo.input_shape(name))
    path.write_bytes(onnx_model.SerializeToString())


class PeakMemory:
    """The largest high-water mark (VmHWM) seen per role among a process and its descendants."""

    def __init__(self, root: int):
        self.root = root
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def _read(pid: int) -> tuple[int, str, int] | None:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return None
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        hwm = int(fields.get("VmHWM", "0 kB").split()[0]) * 1024
        return int(fields["PPid"]), command, hwm

    def _role(self, command: str) -> str:
        if "celery" in command or "worker" in command:
            return "workers"
        if "forkserver" in command or "multiprocessing" in command:
            return "validators"
        return "gateway"

    def _sample(self) -> None:
        while not self._stop.is_set():
            infos = {}
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit() and (info := self._read(int(entry.name))) is not None:
                    infos[int(entry.name)] = info
            family = {self.root}
            changed = True
            while changed:
                changed = False
                for pid, (parent, _, _) in infos.items():
                    if parent in family and pid not in family:
                        family.add(pid)
                        changed = True
            for pid in family:
                if pid in infos:
                    _, command, hwm = infos[pid]
                    role = self._role(command)
                    self.peaks[role] = max(self.peaks.get(role, 0), hwm)
            time.sleep(0.2)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {role: round(peak / MiB, 1) for role, peak in sorted(self.peaks.items())}


def conversion_peak(upload: Path, out: Path) -> float:
    """Peak memory (MB above the process's size before) of the upload's conversion, as the
    gateway's validator runs it."""
    from workers.dataset_files import validate_dataset
    from workers.image_folders import ImageProcessing
    from workers.memory_budget import peak_of

    processing = ImageProcessing.parse("256", "224", "rgb")
    peak = peak_of(lambda: validate_dataset(upload, out, max_bytes=1 << 40, max_samples=10**6,
                                            max_decoded_bytes=1 << 40, processing=processing))
    return round(peak / MiB, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--fit", type=int, default=300, help="held-out images the PCA is fit on")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=None, help="serve --workers (default: one per core)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    stages: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="imagenet-scale-") as folder:
        model_path, zip_path = Path(folder) / f"{args.model}.onnx", Path(folder) / "images.zip"
        started = time.perf_counter()
        export(args.model, model_path)
        jpeg_zip(args.images + args.fit, zip_path)
        stages["prepare (export, write JPEGs)"] = time.perf_counter() - started
        conversion_mb = conversion_peak(zip_path, Path(folder) / "converted.npz")
        server = Server(workers=args.workers)
        memory = PeakMemory(server.process.pid)
        try:
            client = server.client
            started = time.perf_counter()
            with model_path.open("rb") as handle:
                model = client.post("/v1/models", files={"file": (model_path.name, handle)})
            model.raise_for_status()
            stages["upload model"] = time.perf_counter() - started
            started = time.perf_counter()
            with zip_path.open("rb") as handle:
                dataset = client.post("/v1/datasets", files={"file": (zip_path.name, handle)},
                                      data={"resize": "256", "center_crop": "224", "color": "rgb"})
            dataset.raise_for_status()
            stages["upload dataset (JPEG zip -> uint8 npz)"] = time.perf_counter() - started
            spec = {
                "samples": args.images,
                "batch_size": 16,
                "seed": 0,
                "attacks": [
                    {"name": "pgd", "eps": [2 / 255], "steps": args.steps, "norm": "linf"},
                    {"name": "universal", "eps": [8 / 255], "norm": "linf", "max_passes": 1, "max_iter": 5,
                     "candidates": 3},
                ],
                "defenses": [
                    {"name": "pca", "variance": 0.99, "fit_samples": args.fit, "adaptive": False},
                    {"name": "gaussian_noise", "sigma": 0.05, "adaptive": False},
                ],
            }
            started = time.perf_counter()
            job = client.post("/v1/evaluations", json={**spec, "model_id": model.json()["id"],
                                                       "dataset_id": dataset.json()["id"]})
            job.raise_for_status()
            job_id = job.json()["id"]
            while (state := client.get(f"/v1/evaluations/{job_id}").json())["state"] not in (
                    "succeeded", "failed", "cancelled"):
                time.sleep(1)
            stages["evaluation, submit to succeeded"] = time.perf_counter() - started
            if state["state"] != "succeeded":
                raise SystemExit(f"the evaluation ended {state['state']}: {state.get('error')}")
            result = client.get(f"/v1/evaluations/{job_id}/result").json()
            artifacts = client.get(f"/v1/evaluations/{job_id}/artifacts").json()["items"]
            report = client.get(f"/v1/evaluations/{job_id}/report")
        finally:
            peaks = memory.stop()
            server.close()
    delta = next(a for a in artifacts if a["name"].startswith("pgd") and a["name"].endswith(".delta"))
    figures = {
        "model": args.model,
        "images": args.images,
        "fit_images": args.fit,
        "stages_s": {k: round(v, 1) for k, v in stages.items()},
        "evaluation_timing_s": {k: round(v, 1) for k, v in (result.get("timing") or {}).items()},
        "peak_memory_mb": {**peaks, "jpeg zip -> npz conversion, in process": conversion_mb},
        "dataset": {k: dataset.json()[k] for k in ("format", "samples", "shape", "size", "images")},
        "pgd_delta_mb_per_1000_images": round(delta["size"] / MiB * 1000 / args.images, 1),
        "float32_mb_per_1000_images": round(1000 * 3 * 224 * 224 * 4 / MiB, 1),
        "report_kb": round(len(report.content) / 1024, 1),
        "robust_accuracy": {f"{a['attack']}@{a['eps']}": a["robust_accuracy"] for a in result["attacks"]},
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

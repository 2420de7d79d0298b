"""Training input benchmark: where a training step's time goes, input pipeline against model step, side by side.

    python benchmarks/bench_input.py [--data-dir ../shared/data/PetImages-mini] [--device cpu|cuda] [--steps 4] [--repeats 3]

Prints, on any machine, each figure the median of `--repeats` runs in this one process:

1. the input pipeline's images/s on one CPU core (one process, one thread; decode, augment and collate, no model) for
   - `per image`: each photo decoded with `load_image` and augmented with torchvision `transforms.v2` on PIL images,
     one photo at a time, in the loader (the classic recipe, written out here as the reference);
   - `cache`: what `catsdogs_train` runs in its loader: the photo read from the pixel cache and randomly cropped;
   - `decode`: the same without the cache (`--no-pixel-cache`): decoded in draft mode, resized, randomly cropped;
2. the batch augmentation on the training device (`BatchAugment`), images/s;
3. the model step alone (forward, backward, optimizer) on one augmented batch used again and again, images/s; `--compile` adds torch.compile's;
4. the whole fine-tuning loop (loader, augmentation and model step, as `catsdogs_train` runs it on this device) with
   the per-image pipeline and with the cached one;

and then how many CPU cores the cached pipeline needs to keep the measured model step busy."""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

from catsdogs.config import Settings
from catsdogs.data import BatchAugment, ImageDataset, load_image, prepare
from catsdogs.model import build_model
from catsdogs.presets import CLASS_NAMES, shared_sample
from catsdogs.training import make_loader, open_photos, preset_of, resolve_device, train_one_epoch


class PerImageDataset(torch.utils.data.Dataset):
    "The reference: decode each photo and run the whole torchvision augmentation on it, in the loader."
    def __init__(self, rows, root, preset):
        self.paths, self.targets = [Path(root) / p for p in rows.path], [CLASS_NAMES.index(l) for l in rows.label]
        self.draft = preset.resize_size
        self.transform = T.Compose([T.RandomResizedCrop(preset.image_size, scale=(0.7, 1.0), antialias=True),
                                    T.RandomHorizontalFlip(), T.RandomRotation(10), T.ColorJitter(0.2, 0.2, 0.2, 0.02),
                                    T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(preset.mean, preset.std),
                                    T.RandomErasing(p=0.25, scale=(0.02, 0.15))])
    def __len__(self): return len(self.paths)
    def __getitem__(self, i): return self.transform(load_image(self.paths[i], self.draft)), self.targets[i]


def timed(fn, repeats:int) -> float:
    "Median seconds of `repeats` calls of `fn`, after one untimed warm-up call."
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return statistics.median(times)


class Waiting:
    "A loader that adds up the time its consumer waits for each next batch (on CUDA, after the device finishes its queue)."
    def __init__(self, loader, sync):
        self.loader, self.sync, self.seconds = loader, sync, 0.0
    def __len__(self): return len(self.loader)
    def __iter__(self):
        batches = iter(self.loader)
        while True:
            self.sync(); start = time.perf_counter()
            try: batch = next(batches)
            except StopIteration: return
            finally: self.seconds += time.perf_counter() - start
            yield batch


def drain(loader) -> int:
    "Iterate a loader to the end; the number of images it gave."
    return sum(len(y) for _, y in loader)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=shared_sample())
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=4, help="Training steps per timed loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pipeline-images", type=int, default=256, help="Photos per timed pass of an input pipeline")
    parser.add_argument("--compile", action="store_true", help="Also time the model step under torch.compile")
    args = parser.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=args.data_dir, cache_dir=Path(tmp) / "cache", device=str(device))
        prepared = prepare(settings, Path(tmp) / "data", progress=False)
        preset = preset_of(settings)
        start = time.perf_counter()
        cached = open_photos(settings, prepared, progress=False)
        build_s = time.perf_counter() - start
        decoded = open_photos(settings, prepared, cache=False)
        train_rows = prepared.split("train")
        n = min(args.pipeline_images, len(train_rows))
        rows = train_rows.head(n)
        cores = os.cpu_count()
        print(f"== training input on {device} ({cores} CPU cores, {torch.get_num_threads()} threads); {settings.architecture} "
              f"at {settings.image_size} px, batch {settings.batch_size}; medians of {args.repeats}")
        print(f"pixel cache: {len(prepared.manifest)} photos in {build_s:.1f} s with {cores} processes, "
              f"{sum(f.stat().st_size for f in cached.cache.iterdir()) / 2**20:.0f} MB")

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # per core: one process, one thread, no loader workers
        per_core = {}
        for name, dataset in [("per image", PerImageDataset(rows, prepared.root, preset)),
                              ("cache", ImageDataset(rows, cached, train=True)), ("decode", ImageDataset(rows, decoded, train=True))]:
            loader = DataLoader(dataset, settings.batch_size, num_workers=0)
            per_core[name] = n / timed(lambda: drain(loader), args.repeats)
        torch.set_num_threads(threads)
        print("\n1. input pipeline on one CPU core (decode, augment, collate; no model)")
        for name, rate in per_core.items():
            print(f"   {name:>9}: {rate:7.1f} images/s  {1000 / rate:5.2f} ms of CPU per image"
                  + (f"  ({rate / per_core['per image']:.1f}x less CPU than per image)" if name != "per image" else ""))

        batch = next(iter(DataLoader(ImageDataset(rows, cached, train=True), settings.batch_size)))[0].to(device)
        augment = BatchAugment(preset).to(device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        def augment_once():
            with torch.no_grad(): augment(batch)
            sync()
        augment_rate = len(batch) / timed(augment_once, args.repeats * 3)
        print(f"\n2. batch augmentation on {device} (BatchAugment, {threads} threads): {augment_rate:7.1f} images/s")

        model = build_model(settings.architecture).to(device).to(memory_format=torch.channels_last)  # pretrained, as training starts
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
        with torch.no_grad(): x = augment(batch).contiguous(memory_format=torch.channels_last)  # one real batch, used again and again
        y = torch.randint(0, 2, (len(x),), device=device)
        def step(net):
            def run():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = criterion(net(x), y)
                optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step(); sync()
            return run
        model.train()
        for m in model.modules():  # as fine-tuning runs (freeze_bn): BatchNorm statistics fixed
            if isinstance(m, nn.modules.batchnorm._BatchNorm): m.eval()
        step_rates = {"eager": settings.batch_size / timed(step(model), args.repeats)}
        if args.compile: step_rates["torch.compile"] = settings.batch_size / timed(step(torch.compile(model)), args.repeats)
        print("\n3. model step alone (forward, backward, AdamW) on one batch, no loader")
        for name, rate in step_rates.items(): print(f"   {name:>13}: {rate:7.1f} images/s")

        loop_rows = train_rows.head(args.steps * settings.batch_size)
        waited = {}
        def loop(name, loader):
            def run():
                scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0)
                timer = Waiting(loader, sync)
                start = time.perf_counter()
                train_one_epoch(model, timer, criterion, optimizer, scheduler, device, progress=False, freeze_bn=True)
                sync()
                waited.setdefault(name, []).append(timer.seconds / (time.perf_counter() - start))
            return run
        workers = settings.num_workers or (min(8, cores) if device.type == "cuda" else 0)  # what make_loader chooses
        reference = DataLoader(PerImageDataset(loop_rows, prepared.root, preset), settings.batch_size, num_workers=workers,
                               pin_memory=device.type == "cuda")
        loops = {"per image": len(loop_rows) / timed(loop("per image", reference), args.repeats),
                 "cache": len(loop_rows) / timed(loop("cache", make_loader(loop_rows, cached, settings, device, train=True)), args.repeats)}
        print(f"\n4. whole fine-tuning loop on {device} ({args.steps} steps of {settings.batch_size}, {workers} loader workers)")
        for name, rate in loops.items():
            print(f"   {name:>9}: {rate:7.1f} images/s  ({rate / loops['per image']:.2f}x the per-image loop); "
                  f"waiting for the next batch {statistics.median(waited[name]):.0%} of the time")

        model_rate = max(step_rates.values())
        print(f"\nthe model step takes {model_rate:.0f} images/s here; the cached pipeline feeds {per_core['cache']:.0f} per core, so "
              f"{model_rate / per_core['cache']:.2f} cores keep it busy (the per-image pipeline: {model_rate / per_core['per image']:.2f})")


if __name__ == "__main__":
    main()

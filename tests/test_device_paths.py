"""The code paths that a GPU takes, run on the CPU: bf16 autocast, channels_last, generators on the
data's device, and NONE's choice of where its activation matrices live. Without these twins no
CUDA-only line would ever run in a CPU-only test suite."""
from __future__ import annotations

import torch

from bench import engine
from bench.data.base import DatasetInfo, ImageSet
from bench.device import FAST_PATHS_ENV, fast_paths, memory_format
from bench.models.base import build_model

INFO = DatasetInfo("t", 10, (3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3, hflip=True)


def textures(n: int, seed: int = 0) -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    base = torch.rand(10, 3, 16, 16, generator=generator)
    x = (base[y] * 0.8 + 0.2 * torch.rand(n, 3, 16, 16, generator=generator)) * 255
    return ImageSet(x.round().to(torch.uint8), y)


def test_bf16_autocast_is_off_on_the_cpu_unless_asked(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(FAST_PATHS_ENV, raising=False)
    assert not fast_paths(cpu)
    assert fast_paths(torch.device("cuda"))  # decided from the device type alone: no GPU needed
    monkeypatch.setenv(FAST_PATHS_ENV, "1")
    assert fast_paths(cpu)
    assert memory_format(cpu) == memory_format(torch.device("cuda")) == torch.channels_last  # faster on both


def test_training_with_bf16_autocast_and_channels_last_on_the_cpu(monkeypatch, one_thread):
    """The engine's GPU recipe (bf16 autocast, channels_last weights and batches, augmentation
    drawn by a generator on the data's device) trains on the CPU, and its predictions agree with
    float32 ones on the same weights."""
    monkeypatch.setenv(FAST_PATHS_ENV, "1")
    data, test = textures(600), textures(200, seed=1)
    torch.manual_seed(0)
    model = build_model("small-cnn", INFO)
    seen: list[torch.dtype] = []
    handle = model.body[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    history = engine.train(model, data, engine.TrainConfig(epochs=2, batch_size=100, lr=0.05), INFO, seed=0)
    handle.remove()
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert seen and set(seen) == {torch.bfloat16}, "the forward passes did not run under bf16 autocast"
    assert model.body[0].weight.is_contiguous(memory_format=torch.channels_last)
    fast = engine.predict(model, test.x)
    monkeypatch.setenv(FAST_PATHS_ENV, "0")
    exact = engine.predict(model, test.x)
    assert (fast == exact).float().mean() >= 0.95  # bf16 logits: near ties may flip


def test_augmentation_generator_lives_on_the_data_device():
    from bench.data.augment import augment

    x = torch.rand(32, 3, 16, 16)
    first = augment(x, padding=2, hflip=True, generator=torch.Generator(device=x.device).manual_seed(5))
    again = augment(x, padding=2, hflip=True, generator=torch.Generator(device=x.device).manual_seed(5))
    assert torch.equal(first, again) and not torch.equal(first, x)


def test_none_activations_spill_to_host_float16_when_the_device_is_short(monkeypatch, one_thread):
    """NONE keeps its N x channels matrices in float32 on the device when they fit in 30% of the
    free memory, else in float16 on the host; both give the same channel scores and flags."""
    from defenses.none import scoring

    torch.manual_seed(0)
    model = build_model("small-cnn", INFO)
    data = textures(400)
    layers = {"body.4": 32, "body.8": 64}
    roomy = scoring.collect(model, data, layers, batch_size=128)
    monkeypatch.setattr(scoring, "free_memory", lambda device: 1024)
    assert scoring.storage_for(400 * 96, torch.device("cpu")) == (torch.device("cpu"), torch.float16)
    short = scoring.collect(model, data, layers, batch_size=128)
    assert roomy.acts["body.4"].dtype == torch.float32 and short.acts["body.4"].dtype == torch.float16
    assert torch.equal(roomy.probs, short.probs)
    for name in layers:
        torch.testing.assert_close(short.acts[name].float(), roomy.acts[name], rtol=1e-3, atol=1e-3)
    # Downstream, the per-sample scores and the Jenks split agree (a benign model's channel scores
    # are all 0, so fixed channel weights stand in for them here).
    weights = {name: torch.linspace(0, 1, c) for name, c in layers.items()}
    full = scoring.sample_scores(roomy.acts, weights, 2, torch.device("cpu"))
    half = scoring.sample_scores(short.acts, weights, 2, torch.device("cpu"))
    torch.testing.assert_close(half, full, rtol=1e-3, atol=1e-2)
    flagged_full, flagged_half = set(scoring.jenks_split(full).flagged.tolist()), set(scoring.jenks_split(half).flagged.tolist())
    assert len(flagged_full ^ flagged_half) <= 0.01 * len(data)

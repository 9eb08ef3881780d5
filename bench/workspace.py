"""Per-process state of a runner: the artifacts root, the device, and caches of device-resident
data and triggered test sets (so the many cells of one stage reuse them), plus what a result
records about the machine it ran on."""
from __future__ import annotations

import platform
import resource
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, load_model

import bench
from bench import progress
from bench.artifacts import ArtifactWriter, CorruptArtifact, finished, verify
from bench.attack import Attack
from bench.config import build_config
from bench.data.base import DatasetInfo, ImageSet, load_dataset
from bench.data.splits import make_splits
from bench.device import memory_format
from bench.errors import BenchError
from bench.models.base import build_model
from bench.registry import ATTACKS, DATASETS
from bench.spec import StageSpec, content_hash


def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo; elsewhere what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("model name", "Model")):  # x86 / ARM
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, str]:
    """What a result records of the machine that made it. The same code and seed give other floats
    on other CPUs and kernel sets (AVX-512 vs AVX2 vs ARM), so seeds run on different machines
    can be told apart in the report."""
    import torchvision

    from bench.device import describe

    return {"bench": bench.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "device": describe(device), "host": platform.node(),
            "cpu": f"{cpu_name()} ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()} kernels)"}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class Workspace:
    """Per-process state: the artifacts root, the device, and caches of device-resident data
    and triggered test sets (so many defenses of one stage reuse them)."""

    def __init__(self, artifacts_root: Path, device: torch.device) -> None:
        self.root = Path(artifacts_root)
        self.device = device
        self._datasets: dict[str, tuple[DatasetInfo, ImageSet, ImageSet]] = {}
        self._triggered: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def dataset(self, name: str) -> tuple[DatasetInfo, ImageSet, ImageSet]:
        if name not in self._datasets:
            info, train, test = load_dataset(name)
            self._datasets[name] = (info, train.to(self.device), test.to(self.device))
        return self._datasets[name]

    def split(self, spec: StageSpec) -> tuple[DatasetInfo, ImageSet, ImageSet, ImageSet]:
        """(info, reserve, train, test) for the stage's seed, from the data its spec names."""
        info, full, test = self.dataset(spec.dataset)
        expected = DATASETS.get(spec.dataset)().info_for(spec.data_variant).source
        if info.source != expected:
            raise BenchError(f"{spec.dataset}: the data found now ({info.source or 'the published dataset'}) is not the data "
                             f"this stage was planned on ({expected or 'the published dataset'}); run the command again")
        splits = make_splits(full.y, spec.seed)
        return info, full.subset(splits.reserve), full.subset(splits.train), test

    def attack(self, spec: StageSpec) -> Attack:
        info = self.dataset(spec.dataset)[0]
        cls = ATTACKS.get(spec.attack)
        return cls(build_config(cls.Config, spec.attack_config), info, spec.seed)

    def triggered(self, spec: StageSpec, attack: Attack, test: ImageSet):
        if spec.id not in self._triggered:
            self._triggered.clear()  # one stage at a time is enough and bounds memory
            self._triggered[spec.id] = attack.triggered_test_set(test)
        return self._triggered[spec.id]

    def forget_triggered(self, spec: StageSpec) -> None:
        self._triggered.pop(spec.id, None)

    def stage_dir(self, spec: StageSpec) -> Path:
        return self.root / spec.id

    def load_stage(self, spec: StageSpec) -> tuple[torch.nn.Module, Attack, dict]:
        """The finished stage's undefended model and the attack with its learned state, from
        verified artifacts (CorruptArtifact when they are damaged or missing)."""
        directory = self.stage_dir(spec)
        result = verify(directory)
        info = self.dataset(spec.dataset)[0]
        model = build_model(spec.model, info).to(self.device)
        attack = self.attack(spec)
        try:
            load_model(model, str(directory / "model.safetensors"), device=str(self.device))
            model.to(memory_format=memory_format(self.device))  # the layout it was trained and evaluated in
            state_file = directory / "attack_state.safetensors"
            if state_file.is_file():
                attack.load_state_dict({k: v.to(self.device) for k, v in load_file(str(state_file)).items()})
        except Exception as exc:
            raise CorruptArtifact(directory, f"the checkpoint does not load ({exc.__class__.__name__}: {exc})") from None
        return model.eval(), attack, result

    def shared_result(self, stage: StageSpec, kind: str, key: dict, compute: Callable[[Path], dict]) -> tuple[dict, Path]:
        """A result that depends only on the stage's model and ``key``, computed once and reused by
        every cell of the stage: in its own verified artifact directory
        (``<artifacts>/<stage id>-<kind>-<hash of key>/``), written atomically like any other.
        ``compute(directory)`` returns the JSON result and may write files into ``directory``.
        Returns (result, final directory)."""
        directory = self.root / f"{stage.id}-{kind}-{content_hash(key)}"
        cached = finished(directory, progress.log)
        if cached is not None:
            return cached, directory
        writer = ArtifactWriter(directory)
        try:
            result = writer.commit({**compute(writer.tmp), "key": key})
        except BaseException:
            writer.discard()
            raise
        return result, directory

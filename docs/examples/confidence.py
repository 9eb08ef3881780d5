"""A metric plugin: how much confidence in the attack's target a defended model keeps on triggered images.

ASR counts the triggered images whose top prediction is the target. A defense can push ASR down
while the target keeps much of its probability (the backdoor suppressed just below the argmax,
ready to return with a little fine-tuning); this metric reads that residue from the model's
softmax: the mean probability of the target on the triggered test images, and, for scale, on the
same images without their trigger.

    python -m bench run --plugin docs/examples/confidence.py --attacks badnets --defenses undefended,ft
"""
from dataclasses import dataclass

import torch

from bench import engine
from bench.config import require
from bench.metric import Column, Measurement, Metric
from bench.registry import register_metric


@dataclass
class ConfidenceConfig:
    samples: int = 1000  # triggered test images (and as many clean ones); 0: off

    def __post_init__(self) -> None:
        require(self, samples=">= 0")


@register_metric("confidence")
class TargetConfidence(Metric):
    """Mean softmax probability of the attack's target on triggered test images and on the same images clean."""

    Config = ConfidenceConfig
    title = "Confidence in the target"
    description = ("Mean softmax probability (%) of the attack's target class on triggered test images, and on the "
                   "same images without the trigger for scale; a defense that lowers ASR but leaves much of this "
                   "probability has suppressed the backdoor rather than removed it.")
    columns = (
        Column("target_conf", "target confidence", "lower", description="mean target probability on triggered images"),
        Column("target_conf_clean", "clean target confidence", "neither",
               description="mean target probability on the same images without the trigger"),
    )

    def measure(self, ctx) -> Measurement:
        if self.config.samples == 0 or ctx.triggered is None:
            return Measurement()
        x_trig, _, y_target = (t[:self.config.samples] for t in ctx.triggered)
        # the same test images without their trigger: the ones the attack stamps, in its order
        kept = torch.nonzero(ctx.attack.evaluation_mask(ctx.test.y)).flatten()[:len(x_trig)]
        values = {}
        for column, images in (("target_conf", x_trig), ("target_conf_clean", ctx.test.x[kept])):
            probabilities = engine.infer(ctx.model, images, lambda batch: torch.softmax(ctx.model(batch).float(), 1),
                                         ctx.batch_size)
            picked = probabilities.gather(1, y_target.to(probabilities.device).view(-1, 1))
            values[column] = round(100.0 * picked.mean().item(), 2)
        return Measurement(values)
